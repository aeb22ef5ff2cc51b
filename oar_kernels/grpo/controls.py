"""Control methods for OAR: the row's own Bi-Level weights, moved to other tokens.

A gain from OAR could come from reweighting as such (any uneven weights, mean 1) rather than
from putting the weight on the tokens that decide the answer. The controls keep each row's
multiset of weights over its scored span and break the alignment:

* `shuffled`: a uniformly random permutation within the span (seeded);
* `inverted`: rank reversal, the token of the k-th largest weight gets the k-th smallest
  (ties broken by position), so the alignment is anti- rather than un-correlated.
"""

from __future__ import annotations

import torch

from oar_kernels.grpo.config import CONTROLS


def permute_weights(
    weights: torch.Tensor,
    score_mask: torch.Tensor,
    control: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """weights, score_mask: [B, T]; the weights permuted within each row's scored span.

    Outside the span the weights are kept (1 there, SPEC section 6). `generator` (on the
    CPU) draws the shuffles.
    """
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    out = weights.clone()
    for row, mask in enumerate(score_mask.bool()):
        cols = mask.nonzero().flatten()
        span = weights[row, cols]
        if control == "shuffled":
            order = torch.randperm(cols.numel(), generator=generator).to(cols.device)
            out[row, cols] = span[order]
        else:
            ranks = torch.argsort(span, stable=True)  # ascending
            out[row, cols[ranks]] = span[ranks.flip(0)]
    return out
