"""How faithful a batch's token weights are to what the task knows decides the answer.

The filler task knows two things about each completion: its filler tokens cannot change the
answer (a faithful method weighs them at its floor), and a wrong completion's first token
that departs from the reference solution is where it went wrong (a faithful method ranks
it high). Also the effective-sample-size ratio (Σw)²/(nΣw²) of each row's weights: 1 for
uniform weights (GRPO), smaller as the weight concentrates on fewer tokens.
"""

from __future__ import annotations

import torch

EOS = "<eos>"


def ess_ratio(weights: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
    """weights, score_mask: [B, T]; [R] float, (Σw)²/(nΣw²) of each row with a scored token."""
    mask = score_mask.bool()
    w = torch.where(mask, weights.double(), 0.0)
    n = mask.sum(1)
    kept = n > 0
    ratio = w.sum(1) ** 2 / (n * (w * w).sum(1)).clamp_min(1e-300)
    return ratio[kept]


def filler_share(weights: torch.Tensor, score_mask: torch.Tensor, filler_mask: torch.Tensor):
    """The share of the batch's scored weight mass on filler tokens, and the share of scored
    tokens that are fillers (what uniform weights give); (0, 0) with no filler scored.

    Pooled over the batch's scored tokens: a row's share counts by its length.
    """
    mask = score_mask.bool()
    filler = filler_mask.bool() & mask
    total = weights[mask].double().sum()
    if not filler.any() or total <= 0:
        return 0.0, 0.0
    return (weights[filler].double().sum() / total).item(), (filler.sum() / mask.sum()).item()


def first_departure(tokens: list[str], reference: str, fillers: str) -> int | None:
    """The index in `tokens` (one completion, one character each, `<eos>` last if sampled)
    of the first non-filler token that departs from `reference` (the filler-free solution,
    then `<eos>`); None when the completion is a prefix of it (cut short, or right)."""
    expected = [*reference, EOS]
    position = 0
    for index, token in enumerate(tokens):
        if token in fillers and len(token) == 1:
            continue
        if position >= len(expected) or token != expected[position]:
            return index
        position += 1
    return None


def rank_percentile(values: torch.Tensor, index: int) -> float:
    """values: [n]; where values[index] ranks among them, from 0 (smallest) to 1 (largest),
    ties counted half (so equal values give 0.5)."""
    n = values.numel()
    if n < 2:
        return 0.5
    value = values[index]
    below = (values < value).sum().item()
    ties = (values == value).sum().item() - 1
    return (below + 0.5 * ties) / (n - 1)


def departure_percentile(
    weights: torch.Tensor, score_mask: torch.Tensor, column: int
) -> float | None:
    """weights, score_mask: [T] of one row; the rank percentile of the token at `column`
    among the row's scored tokens, None when that token is not scored."""
    mask = score_mask.bool()
    if not mask[column]:
        return None
    return rank_percentile(weights[mask], int(mask[:column].sum()))


def batch_metrics(
    weights: torch.Tensor,
    score_mask: torch.Tensor,
    filler_mask: torch.Tensor,
    departures: list[int | None],
) -> dict[str, float]:
    """The step's record: filler weight and token shares, the mean ESS ratio over rows, and
    the mean departure percentile over the rows with a scored departure (`departures`: one
    column per row, None for rows that are right or have none).

    weights, score_mask, filler_mask: [B, T].
    """
    share, tokens = filler_share(weights, score_mask, filler_mask)
    ess = ess_ratio(weights, score_mask)
    record = {
        "filler_weight_share": share,
        "filler_token_share": tokens,
        "ess_ratio": ess.mean().item() if ess.numel() else 1.0,
    }
    percentiles = [
        p
        for row, column in enumerate(departures)
        if column is not None
        and (p := departure_percentile(weights[row], score_mask[row], column)) is not None
    ]
    record["departure_rows"] = len(percentiles)
    if percentiles:
        record["departure_percentile"] = sum(percentiles) / len(percentiles)
    return record
