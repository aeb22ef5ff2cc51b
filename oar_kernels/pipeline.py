"""`oar_advantages`: per-token advantages for a GRPO batch in one pass (SPEC section 8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oar_kernels import reshape
from oar_kernels._checks import require_finite
from oar_kernels.importance.gradient import clean_sequence_logprobs, run_gradient_importance
from oar_kernels.importance.perturbation import perturbation_importance

METHODS = ("gradient", "perturbation")


@dataclass
class OARAdvantages:
    advantages: torch.Tensor  # [B, T] float32 per-token advantages A_b * w_bt
    scores: torch.Tensor  # [B, T] float32 importance, 0 outside score_mask
    weights: torch.Tensor  # [B, T] float32 Bi-Level weights, 1 outside score_mask
    old_logprobs: torch.Tensor  # [B, T] float32 log p(x_t | x_<t) of the unperturbed input


def oar_advantages(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    answer_mask: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    method: str = "gradient",
    mode: str = "answer_joint",
    noise_std: float | None = None,
    mask_token_id: int | None = None,
    generator: torch.Generator | None = None,
    max_batch_tokens: int | None = None,
    tau: float = reshape.TAU,
    beta: float = reshape.BETA,
    floor: float = reshape.FLOOR,
    preserve_mass: bool = True,
) -> OARAdvantages:
    """Importance, Bi-Level weights, per-token advantages and old logprobs for a GRPO batch.

    In answer_joint mode one forward with grad on the input embeddings yields both phi and
    the per-token old logprobs the GRPO step needs anyway, and one input-only backward yields
    the saliency. noise_std defaults to 0 there (so the old logprobs are exact; SPEC section 5
    allows it; rows without an answer span then score 0 and keep weight 1) and to 1e-3 in the
    KL modes, whose clean forward gives the old logprobs.
    method="perturbation" (OAR-P) needs mask_token_id; its old logprobs come from one extra
    clean forward of the batch.
    advantages: [B] (GRPO's per-sequence advantages) or [B, T]. Other arguments as in
    `gradient_importance`, `perturbation_importance` and `reshape_advantages`. B = 0 or T = 0
    gives empty [B, T] fields.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    # Everything the reshape needs is checked before the (expensive) importance pass.
    reshape.check_params(tau, beta, floor, preserve_mass)
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        reshape.check_advantages(advantages, input_ids, like_name="input_ids")
        require_finite("advantages", advantages)
    if method == "perturbation":
        if mask_token_id is None:
            raise ValueError('method="perturbation" needs mask_token_id')
        budget = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
        scores = perturbation_importance(
            model,
            input_ids,
            attention_mask,
            score_mask,
            answer_mask,
            mode=mode,
            mask_token_id=mask_token_id,
            **budget,
        )
        old_logprobs = clean_sequence_logprobs(model, input_ids, attention_mask)
    else:
        if noise_std is None:
            noise_std = 0.0 if mode == "answer_joint" else 1e-3
        scores, old_logprobs = run_gradient_importance(
            model,
            input_ids,
            attention_mask,
            score_mask,
            answer_mask,
            mode=mode,
            noise_std=noise_std,
            generator=generator,
            max_batch_tokens=max_batch_tokens,
            noise=None,
            want_old_logprobs=True,
        )
    reshape.check_advantages(advantages, scores)
    weights = reshape.bilevel_weights(
        scores, score_mask, tau=tau, beta=beta, floor=floor, preserve_mass=preserve_mass
    )
    return OARAdvantages(
        reshape.weigh_advantages(advantages.detach(), weights), scores, weights, old_logprobs
    )


def weight_statistics(weights: torch.Tensor, score_mask: torch.Tensor) -> dict[str, float]:
    """How concentrated a batch's Bi-Level weights are, for logs.

    weights, score_mask: [B, T]. top10_mass is the mean over rows of the share of the row's
    weight mass on its top 10% scored tokens (0.1 when the weights are flat); weight_min,
    weight_max and weight_std are over all scored tokens. Empty dict when nothing is scored.
    """
    scored = weights[score_mask.bool()]
    if scored.numel() == 0:
        return {}
    shares = []
    for row, mask in zip(weights, score_mask.bool()):
        w = row[mask]
        if w.numel():
            top = w.topk(max(1, int(0.1 * w.numel()))).values.sum()
            shares.append((top / w.sum()).item())
    return {
        "top10_mass": sum(shares) / len(shares),
        "weight_min": scored.min().item(),
        "weight_max": scored.max().item(),
        "weight_std": scored.float().std(correction=0).item(),
    }
