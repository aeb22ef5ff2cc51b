"""OAR in TRL: a `GRPOTrainer` whose advantages are per-token OAR advantages.

    from oar_kernels.integrations.trl import OARGRPOTrainer
    trainer = OARGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                             train_dataset=..., oar_method="gradient")

Only `_generate_and_score_completions` changes (TRL's documented place to change advantages):
after TRL has generated, scored and normalised, the per-sequence advantages [B] become
A_b * w_bt [B, T_completion] from OAR-G (or OAR-P) importance and the Bi-Level reshape, and
TRL's loss, which accepts [B, T] advantages, trains on them. Requires `pip install ".[oar]"`.
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from oar_kernels import reshape, spans
from oar_kernels.importance import gradient_importance, perturbation_importance
from oar_kernels.pipeline import weight_statistics

METHODS = ("gradient", "perturbation")


class OARGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with Outcome-grounded Advantage Reshaping.

    oar_method: "gradient" (OAR-G) or "perturbation" (OAR-P, mask token = the pad token).
    oar_mode: outcome functional, "answer_joint", "answer_mean" or "last".
    answer_format: how the answer is found in completions (see `oar_kernels.spans`).
    oar_reshape: keyword arguments of the Bi-Level reshape (tau, beta, floor, preserve_mass).
    """

    def __init__(
        self,
        *args,
        oar_method: str = "gradient",
        oar_mode: str = "answer_joint",
        answer_format="boxed",
        oar_reshape: dict | None = None,
        **kwargs,
    ):
        if oar_method not in METHODS:
            raise ValueError(f"oar_method must be one of {METHODS}, got {oar_method!r}")
        super().__init__(*args, **kwargs)
        # Options whose losses cannot take per-token advantages.
        if self.args.use_liger_kernel:
            raise ValueError(
                "OARGRPOTrainer needs use_liger_kernel=False: Liger's fused GRPO "
                "loss takes one advantage per sequence"
            )
        if self.args.loss_type == "luspo" or self.args.importance_sampling_level != "token":
            raise ValueError(
                "OARGRPOTrainer needs token-level losses: loss_type 'luspo' and "
                "importance_sampling_level != 'token' weigh whole sequences"
            )
        self.oar_method, self.oar_mode, self.answer_format = oar_method, oar_mode, answer_format
        self.oar_reshape = dict(oar_reshape or {})

    def _importance(self, input_ids, attention_mask, score_mask, answer_mask):
        model = self.accelerator.unwrap_model(self.model)
        if self.oar_method == "perturbation":
            mask_id = self.processing_class.pad_token_id
            return perturbation_importance(
                model,
                input_ids,
                attention_mask,
                score_mask,
                answer_mask,
                mode=self.oar_mode,
                mask_token_id=mask_id,
            )
        # Without noise the joint objective is deterministic (SPEC section 5 allows it).
        noise = 0.0 if self.oar_mode == "answer_joint" else 1e-3
        return gradient_importance(
            model,
            input_ids,
            attention_mask,
            score_mask,
            answer_mask,
            mode=self.oar_mode,
            noise_std=noise,
        )

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        prompt_mask, completion_mask = output["prompt_mask"], output["completion_mask"]
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).bool()
        completion = torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1).bool()
        score_mask, answer_mask = spans.completion_spans(
            self.processing_class,
            input_ids.cpu(),
            completion.cpu(),
            answer_format=self.answer_format,
        )
        score_mask, answer_mask = score_mask.to(input_ids.device), answer_mask.to(input_ids.device)
        scores = self._importance(input_ids, attention_mask, score_mask, answer_mask)
        weights = reshape.bilevel_weights(scores, score_mask, **self.oar_reshape)
        per_token = reshape.weigh_advantages(output["advantages"], weights)
        output["advantages"] = per_token[:, prompt_mask.shape[1] :]
        self._log_weights(weights[:, prompt_mask.shape[1] :], score_mask[:, prompt_mask.shape[1] :])
        return output

    def _log_weights(self, weights, score_mask):
        """Share of the advantage mass on each row's top-10% tokens, and the weight spread."""
        mode = "train" if self.model.training else "eval"
        for name, value in weight_statistics(weights, score_mask).items():
            self._metrics[mode][f"oar/{name}"].append(value)
