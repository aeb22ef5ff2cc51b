"""`oar_advantages`: per-token advantages for a GRPO batch in one pass (SPEC section 8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oar_kernels import reshape
from oar_kernels._checks import require_finite
from oar_kernels.importance.batch import require_finite_scores
from oar_kernels.importance.causal_lm import clean_sequence_logprobs
from oar_kernels.importance.gradient import GRADIENT_OVERFLOW, NOISE_STD, run_gradient_importance
from oar_kernels.importance.perturbation import perturbation_importance
from oar_kernels.importance.variants import DEFAULT_TOP_K, hybrid_importance

METHODS = ("gradient", "perturbation", "hybrid")
# The methods that run counterfactuals: they need a mask_token_id.
COUNTERFACTUAL = ("perturbation", "hybrid")


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
    stride: int = 1,
    segments: torch.Tensor | None = None,
    top_k: int | None = None,
) -> OARAdvantages:
    """Importance, Bi-Level weights, per-token advantages and old logprobs for a GRPO batch.

    In answer_joint mode one forward with grad on the input embeddings yields both phi and
    the per-token old logprobs the GRPO step needs anyway, and one input-only backward yields
    the saliency. noise_std None defaults to 0 there (so the old logprobs are exact; SPEC
    section 5 allows it; rows without an answer span then score 0 and keep weight 1) and to
    NOISE_STD (1e-3) in the KL modes, whose clean forward gives the old logprobs. This is the
    one place that picks the default: the TRL and verl adapters pass None.
    method="perturbation" (OAR-P) needs mask_token_id; its old logprobs come from one extra
    clean forward of the batch. Its opt-in approximations: stride (score every k-th scored
    token, fill the rest) and segments (mask a span at once), as in
    `perturbation_importance`. method="hybrid" (opt-in): OAR-G ranks each row's scored
    tokens and exact OAR-P scores its top_k (default DEFAULT_TOP_K), the rest get a fallback
    below them (`importance.variants.hybrid_importance`); it needs mask_token_id, noise_std
    None is NOISE_STD for its ranking, and its old logprobs come from a clean forward.
    advantages: [B] (GRPO's per-sequence advantages) or [B, T]. Other arguments as in
    `gradient_importance`, `perturbation_importance` and `reshape_advantages`. B = 0 or T = 0
    gives empty [B, T] fields.
    Host reads (OAR-G): the advantages' finiteness, the batch checks, and finite scores and
    weighted advantages together at the end; the decoder adds its own (transformers reads the
    attention mask to pick the SDPA path).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    # Everything the reshape needs is checked before the (expensive) importance pass.
    reshape.check_params(tau, beta, floor, preserve_mass)
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        reshape.check_advantages(advantages, input_ids, like_name="input_ids")
        require_finite("advantages", advantages)
    _check_variant_options(method, stride, segments, top_k)
    if method in COUNTERFACTUAL and mask_token_id is None:
        raise ValueError(f"method={method!r} needs mask_token_id")
    batch = (model, input_ids, attention_mask, score_mask, answer_mask)
    if method == "perturbation":
        budget = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
        scores = perturbation_importance(
            *batch,
            mode=mode,
            mask_token_id=mask_token_id,
            stride=stride,
            segments=segments,
            **budget,
        )
        old_logprobs = clean_sequence_logprobs(model, input_ids, attention_mask)
    elif method == "hybrid":
        if max_batch_tokens is not None:
            raise ValueError(
                'method="hybrid" sizes its micro-batches by memory: max_batch_tokens must be None'
            )
        scores = hybrid_importance(
            *batch,
            mode=mode,
            mask_token_id=mask_token_id,
            k=DEFAULT_TOP_K if top_k is None else top_k,
            noise_std=NOISE_STD if noise_std is None else noise_std,
            generator=generator,
        )
        old_logprobs = clean_sequence_logprobs(model, input_ids, attention_mask)
    else:
        if noise_std is None:
            noise_std = 0.0 if mode == "answer_joint" else NOISE_STD
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
            check_finite=False,  # read with the weighted advantages below
        )
    reshape.check_advantages(advantages, scores)
    weights = reshape.bilevel_weights(
        scores,
        score_mask,
        tau=tau,
        beta=beta,
        floor=floor,
        preserve_mass=preserve_mass,
        check_finite=False,
    )
    weighted = reshape.weigh_advantages(advantages.detach(), weights, check_finite=False)
    _require_finite_outputs(scores, weights, weighted, advantages)
    return OARAdvantages(weighted, scores, weights, old_logprobs)


def _check_variant_options(method, stride, segments, top_k) -> None:
    """The variant options belong to one method each: given to another, a ValueError."""
    given = {
        "stride": stride != 1,
        "segments": segments is not None,
        "top_k": top_k is not None,
    }
    owner = {"stride": "perturbation", "segments": "perturbation", "top_k": "hybrid"}
    wrong = [name for name, set_ in given.items() if set_ and owner[name] != method]
    if wrong:
        owners = ", ".join(f"{name} with method={owner[name]!r}" for name in wrong)
        raise ValueError(f"{owners} only; got method={method!r}")


def _require_finite_outputs(scores, weights, weighted, advantages) -> None:
    """Finite scores and weighted advantages, in one read back to the host: their float64
    sum is finite exactly when every term is (float32 terms cannot overflow it). The checks
    that name the fault run only when something is wrong."""
    total = scores.sum(dtype=torch.float64) + weighted.sum(dtype=torch.float64)
    if bool(total - total == 0):  # NaN for an Inf or NaN
        return
    require_finite_scores(scores, GRADIENT_OVERFLOW)
    reshape.weigh_advantages(advantages.detach(), weights)  # raises the overflow's message


def weight_statistics(weights: torch.Tensor, score_mask: torch.Tensor) -> dict[str, float]:
    """How concentrated a batch's Bi-Level weights are, for logs.

    weights, score_mask: [B, T]. top10_mass is the mean over rows of the share of the row's
    weight mass on its top 10% scored tokens (0.1 when the weights are flat); weight_min,
    weight_max and weight_std are over all scored tokens. Empty dict when nothing is scored.
    """
    if weights.numel() == 0:
        return {}
    mask = score_mask.bool()
    counts = mask.sum(dim=1)
    scored = torch.where(mask, weights, 0.0)
    tokens = counts.sum().clamp(min=1)
    # Each row's top max(1, int(0.1 n)) scored weights: the head of its descending sort.
    ordered = torch.where(mask, weights, float("-inf")).sort(dim=1, descending=True).values
    top_k = (counts.double() * 0.1).long().clamp(min=1)
    in_top = torch.arange(weights.shape[1], device=weights.device) < top_k[:, None]
    shares = torch.where(in_top, ordered, 0.0).sum(dim=1) / scored.sum(dim=1)
    rows = counts > 0
    mean = scored.sum() / tokens
    summary = torch.stack(
        [
            torch.where(rows, shares, 0.0).sum() / rows.sum().clamp(min=1),
            torch.where(mask, weights, float("inf")).amin(),
            torch.where(mask, weights, float("-inf")).amax(),
            (torch.where(mask, weights - mean, 0.0).square().sum() / tokens).sqrt(),
            counts.sum().to(weights.dtype),
        ]
    ).tolist()  # one read back to the host, not one per row
    if summary[-1] == 0:  # nothing scored
        return {}
    return dict(zip(("top10_mass", "weight_min", "weight_max", "weight_std"), summary[:-1]))
