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

from oar_kernels import pipeline, spans
from oar_kernels.importance.batch import require_mode

# The Bi-Level reshape's keywords of `pipeline.oar_advantages` (SPEC section 6).
RESHAPE_KEYS = ("tau", "beta", "floor", "preserve_mass")


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
        if oar_method not in pipeline.METHODS:
            raise ValueError(f"oar_method must be one of {pipeline.METHODS}, got {oar_method!r}")
        require_mode("oar_mode", oar_mode)
        unknown = sorted(set(oar_reshape or {}) - set(RESHAPE_KEYS))
        if unknown:
            raise ValueError(f"oar_reshape keys must come from {RESHAPE_KEYS}, got {unknown}")
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
        perturbation = self.oar_method == "perturbation"
        oar = pipeline.oar_advantages(
            self.accelerator.unwrap_model(self.model),
            input_ids,
            attention_mask,
            score_mask.to(input_ids.device),
            answer_mask.to(input_ids.device),
            output["advantages"],
            method=self.oar_method,
            mode=self.oar_mode,
            mask_token_id=self.processing_class.pad_token_id if perturbation else None,
            **self.oar_reshape,
        )
        prompt_width = prompt_mask.shape[1]
        output["advantages"] = oar.advantages[:, prompt_width:]
        self._log_weights(oar.weights[:, prompt_width:], score_mask[:, prompt_width:])
        return output

    def _log_weights(self, weights, score_mask):
        """Share of the advantage mass on each row's top-10% tokens, and the weight spread."""
        mode = "train" if self.model.training else "eval"
        for name, value in pipeline.weight_statistics(weights, score_mask).items():
            self._metrics[mode][f"oar/{name}"].append(value)
