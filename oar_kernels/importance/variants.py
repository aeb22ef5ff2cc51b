"""Cheaper OAR-P variants (opt-in; exact per-token OAR-P stays the default).

* Segments for `perturbation_importance(segments=)`: fixed-length windows of each row's
  scored tokens (`window_segments`), or reasoning steps ended by delimiter tokens such as a
  newline or a full stop (`step_segments`). One counterfactual masks a whole segment.
* The hybrid (`hybrid_importance`): OAR-G ranks each row's scored tokens, exact OAR-P scores
  only the top k of them, and the rest get a fallback below every exact score of the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oar_kernels._checks import require_int, require_mask, require_token_ids
from oar_kernels.importance.causal_lm import vocab_size
from oar_kernels.importance.gradient import NOISE_STD, gradient_importance
from oar_kernels.importance.perturbation import (
    DEFAULT_MAX_BATCH_BYTES,
    PerturbationStats,
    perturbation_importance,
)

DEFAULT_TOP_K = 32
# The fallback of the tokens the hybrid does not score exactly stays within this share of
# the row's smallest exact score (so strictly below it when that score is positive).
FALLBACK_SHARE = 0.5


def _scored_rank(score_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] int64: each scored token's index among its row's scored tokens (0, 1, ...)."""
    return score_mask.long().cumsum(1) - 1


def window_segments(score_mask: torch.Tensor, width: int) -> torch.Tensor:
    """Segment ids [B, T] int64: each row's scored tokens in windows of `width` consecutive
    scored tokens (in column order); -1 outside score_mask.

    score_mask: [B, T] bool or integer; width >= 1 (1 gives exact OAR-P's counterfactuals).
    """
    width = require_int("width", width, 1)
    score = require_mask("score_mask", score_mask, getattr(score_mask, "shape", None))
    return torch.where(score, _scored_rank(score) // width, -1)


def step_segments(
    input_ids: torch.Tensor, score_mask: torch.Tensor, delimiter_ids: list[int] | tuple[int, ...]
) -> torch.Tensor:
    """Segment ids [B, T] int64: reasoning steps, a new one starting after each scored token
    whose id is in `delimiter_ids` (the delimiter ends its own step); -1 outside score_mask.

    input_ids, score_mask: [B, T]; delimiter_ids: token ids (e.g. the newline's, or ".").
    """
    input_ids = require_token_ids("input_ids", input_ids)
    score = require_mask("score_mask", score_mask, input_ids.shape)
    if not isinstance(delimiter_ids, (list, tuple)) or not delimiter_ids:
        raise TypeError(f"delimiter_ids must be a non-empty list of ints, got {delimiter_ids!r}")
    ids = [require_int("delimiter_ids", i, 0) for i in delimiter_ids]
    ends = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device)) & score
    before = ends.long().cumsum(1) - ends.long()  # delimiters strictly before each token
    return torch.where(score, before, -1)


@dataclass
class HybridStats:
    perturbation: PerturbationStats  # the exact OAR-P pass on the top-k tokens
    gradient_token_forwards: int  # the OAR-G pass in token forwards (see `hybrid_importance`)
    exact_tokens: int  # tokens scored exactly (sum over rows of min(k, scored))

    @property
    def token_forwards(self) -> int:
        return self.perturbation.token_forwards + self.gradient_token_forwards


def _top_k_mask(ranking: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T] bool: each row's k scored tokens of highest `ranking` (all of them if fewer);
    ties go to the earlier column (a stable sort)."""
    keyed = torch.where(score, ranking.double(), float("-inf"))
    order = keyed.sort(dim=1, descending=True, stable=True).indices[:, :k]
    top = torch.zeros_like(score)
    top.scatter_(1, order, True)
    return top & score


def _fallback(exact, ranking, top, score):
    """Scores of the scored tokens outside `top`: FALLBACK_SHARE * m * g / max g, with m the
    row's smallest exact score clamped at 0 and g the OAR-G score (max over the row's rest):
    in [0, FALLBACK_SHARE * m], OAR-G's order among them, 0 where m <= 0 or g is all 0."""
    rest = score & ~top
    m = torch.where(top, exact.double(), float("inf")).amin(1, keepdim=True).clamp(min=0)
    m = torch.where(torch.isinf(m), 0.0, m)  # a row with nothing exact
    g = torch.where(rest, ranking.double(), 0.0)
    top_g = g.amax(1, keepdim=True)
    scaled = torch.where(top_g > 0, g / torch.where(top_g > 0, top_g, 1.0), 0.0)
    return torch.where(rest, FALLBACK_SHARE * m * scaled, 0.0).float()


def hybrid_importance(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    answer_mask: torch.Tensor | None = None,
    *,
    mode: str = "last",
    mask_token_id: int,
    k: int = DEFAULT_TOP_K,
    noise_std: float = NOISE_STD,
    generator: torch.Generator | None = None,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    return_stats: bool = False,
):
    """OAR-G ranks, exact OAR-P scores the top k of each row, a fallback for the rest.

    Arguments as in `perturbation_importance` (mode is the outcome of both passes) and
    `gradient_importance` (noise_std, generator: the OAR-G pass's noise); k >= 1.
    Each row's k scored tokens of highest OAR-G score (all of them when it has <= k; ties
    to the earlier column) get their exact OAR-P score (`perturbation_importance` with
    those tokens as the score mask; equal to the full call's up to rounding). Every
    other scored token gets FALLBACK_SHARE * m * g_s / max g, m being the row's smallest
    exact score clamped at 0 and g the OAR-G scores of the row's other tokens: at most half
    of m, so the Bi-Level reshape ranks them below every exact token of the row (when m > 0;
    when m <= 0 they score 0, as the reshape sees m), and OAR-G's order among them is kept.
    Returns [B, T] float32 (0 outside score_mask), and HybridStats if asked: the OAR-P
    pass's stats, and OAR-G charged as 4 token forwards per real token (a clean forward, a
    forward with grad, and its input-only backward counted as two forwards; the joint mode
    needs no clean forward but is charged the same).
    """
    k = require_int("k", k, 1)
    # Checked before the OAR-G pass, not after it.
    require_int("mask_token_id", mask_token_id, 0, vocab_size(model) - 1)
    ranking = gradient_importance(
        model,
        input_ids,
        attention_mask,
        score_mask,
        answer_mask,
        mode=mode,
        noise_std=noise_std,
        generator=generator,
    )
    score = score_mask.bool()
    top = _top_k_mask(ranking, score, k)
    exact, stats = perturbation_importance(
        model,
        input_ids,
        attention_mask,
        top,
        answer_mask,
        mode=mode,
        mask_token_id=mask_token_id,
        max_batch_bytes=max_batch_bytes,
        return_stats=True,
    )
    scores = torch.where(top, exact, _fallback(exact, ranking, top, score))
    if not return_stats:
        return scores
    forwards = 4 * int(attention_mask.bool().sum())  # OAR-G runs every real token
    return scores, HybridStats(stats, forwards, int(top.sum()))


__all__ = [
    "DEFAULT_TOP_K",
    "FALLBACK_SHARE",
    "HybridStats",
    "hybrid_importance",
    "step_segments",
    "window_segments",
]
