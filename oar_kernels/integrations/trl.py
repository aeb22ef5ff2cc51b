"""OAR in TRL: a `GRPOTrainer` whose advantages are per-token OAR advantages.

    from oar_kernels.integrations.trl import OARGRPOTrainer
    trainer = OARGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                             train_dataset=..., oar_method="gradient")

`_generate_and_score_completions` changes (TRL's documented place to change advantages):
after TRL has generated, scored and normalised, the per-sequence advantages [B] become
A_b * w_bt [B, T_completion] from OAR-G (or OAR-P) importance and the Bi-Level reshape
(`pipeline.oar_advantages`), and TRL's loss, which accepts [B, T] advantages, trains on them.
With `oar_fused_loss=True` the loss is instead `oar_kernels.grpo_loss` from the model's final
hidden states (the lm head applied chunk by chunk inside the op), with TRL's own values: its
loss_type, clip range, KL weight and reference logprobs, temperature, dr_grpo's
max_completion_length, dapo's token count of the step, and its gradient-accumulation scaling;
its value and gradients equal TRL's `_compute_loss`. Requires `pip install ".[oar]"`.
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from oar_kernels import pipeline, spans
from oar_kernels.importance.batch import require_mode
from oar_kernels.importance.causal_lm import logit_transform
from oar_kernels.loss import LOSS_TYPES, grpo_loss

# The Bi-Level reshape's keywords of `pipeline.oar_advantages` (SPEC section 6).
RESHAPE_KEYS = ("tau", "beta", "floor", "preserve_mass")


class OARGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with Outcome-grounded Advantage Reshaping.

    oar_method: "gradient" (OAR-G), "perturbation" (OAR-P, mask token = the pad token) or
    "hybrid" (OAR-G ranks, OAR-P scores each row's top DEFAULT_TOP_K; opt-in, see
    oar_advantages).
    oar_mode: outcome functional, "answer_joint", "answer_mean" or "last".
    answer_format: how the answer is found in completions (see `oar_kernels.spans`).
    oar_reshape: keyword arguments of the Bi-Level reshape (tau, beta, floor, preserve_mass).
    oar_fused_loss: compute TRL's loss with `oar_kernels.grpo_loss` (no [B, T, V] logits);
    loss types grpo, bnpo, dapo, dr_grpo, and none of the options that loss leaves out
    (`_fused_loss_refusals`).
    """

    def __init__(
        self,
        *args,
        oar_method: str = "gradient",
        oar_mode: str = "answer_joint",
        answer_format="boxed",
        oar_reshape: dict | None = None,
        oar_fused_loss: bool = False,
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
        self.oar_fused_loss = bool(oar_fused_loss)
        refused = self._fused_loss_refusals() if self.oar_fused_loss else []
        if refused:
            raise ValueError(f"oar_fused_loss=True does not implement {'; '.join(refused)}")

    def _fused_loss_refusals(self) -> list[str]:
        """The settings under which TRL's loss has terms grpo_loss does not compute."""
        args = self.args
        checks = {
            f"loss_type {args.loss_type!r} (only {LOSS_TYPES})": args.loss_type not in LOSS_TYPES,
            "top_entropy_quantile < 1": args.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
            "delta (two-sided clipping)": args.delta is not None,
            "vLLM importance-sampling correction": bool(
                args.use_vllm and args.vllm_importance_sampling_correction
            ),
            "use_bias_correction_kl": bool(args.beta != 0.0 and args.use_bias_correction_kl),
            "an entropy bonus": bool(self._entropy_bonus_enabled),
            "a router aux loss": bool(self.aux_loss_enabled),
            "soft-capped logits (final_logit_softcapping)": logit_transform(
                self.accelerator.unwrap_model(self.model)
            ).softcap
            is not None,
        }
        return [name for name, refused in checks.items() if refused]

    def _compute_loss(self, model, inputs):
        if not self.oar_fused_loss:
            return super()._compute_loss(model, inputs)
        if inputs.get("pixel_values") is not None:
            raise ValueError("oar_fused_loss=True takes text-only batches (pixel_values given)")
        train = self.model.training
        completion_ids = inputs["completion_ids"]
        width = completion_ids.shape[1]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        # Through the (possibly data-parallel) wrapper, so its gradient hooks run; the final
        # hidden states come back, and logits only for the last position.
        out = model(
            input_ids=torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        )
        unwrapped = self.accelerator.unwrap_model(model)
        head = unwrapped.get_output_embeddings()
        hidden = out.hidden_states[-1][:, -width - 1 : -1].to(head.weight.dtype)
        result = grpo_loss(
            hidden,
            head.weight,
            completion_ids,
            inputs["advantages"],
            mask,
            old_logprobs=inputs.get("old_per_token_logps"),
            ref_logprobs=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
            bias=getattr(head, "bias", None),
            loss_type=self.loss_type,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            beta=self.beta,
            # A scaled head's logits are scale * l: temperature / scale divides l alike.
            temperature=self.temperature / logit_transform(unwrapped).scale,
            **self._loss_normaliser(inputs, train),
        )
        self._log_loss(result, mask, train)
        if self.loss_type == "dapo" or not train:
            return result.loss  # dapo's token count spans the accumulated micro-batches
        return result.loss / self.current_gradient_accumulation_steps

    def _loss_normaliser(self, inputs, train: bool) -> dict:
        """TRL's normaliser of this loss type as grpo_loss's keyword (SPEC section 7)."""
        if self.loss_type == "dr_grpo":
            return {"max_completion_length": self.max_completion_length}
        if self.loss_type != "dapo":
            return {}
        # inputs["num_items_in_batch"] counts the tokens of the generation batch on every
        # process; gradients are averaged over processes, and one optimizer step accumulates
        # current_gradient_accumulation_steps of the steps_per_generation micro-batches.
        count = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if train:
            window = self.current_gradient_accumulation_steps / self.args.steps_per_generation
            count = count * window
        return {"num_items_in_batch": count}

    def _log_loss(self, result, mask, train: bool) -> None:
        """TRL's clip-ratio and KL metrics: masked means over every process's tokens."""
        tokens = mask.sum().float()
        local = torch.stack([result.clip_fraction * tokens, result.mean_kl * tokens, tokens])
        totals = self.accelerator.reduce(local.float(), reduction="sum")
        means = (totals[:2] / totals[2].clamp(min=1.0)).tolist()
        metrics = self._metrics["train" if train else "eval"]
        metrics["clip_ratio/region_mean"].append(means[0])
        if self.beta != 0.0:
            metrics["kl"].append(means[1])

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
        counterfactual = self.oar_method in pipeline.COUNTERFACTUAL
        oar = pipeline.oar_advantages(
            self.accelerator.unwrap_model(self.model),
            input_ids,
            attention_mask,
            score_mask.to(input_ids.device),
            answer_mask.to(input_ids.device),
            output["advantages"],
            method=self.oar_method,
            mode=self.oar_mode,
            mask_token_id=self.processing_class.pad_token_id if counterfactual else None,
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
