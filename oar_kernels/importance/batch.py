"""The padded batch both importance ops take (SPEC sections 2, 3): the outcome modes, the
batch checks, the outcome positions, and the finite-scores check.

The value checks run on the device and are read back to the host once, together with what
each op needs to know about the batch (`PendingChecks`), so a pass reads nothing else up front.
"""

from __future__ import annotations

import torch

from oar_kernels._checks import require_mask, require_same_device, require_token_ids
from oar_kernels.importance.causal_lm import require_causal_lm, vocab_size

MODES = ("answer_joint", "answer_mean", "last")


def require_mode(name: str, mode) -> str:
    """An outcome functional (SPEC section 3): one of MODES, else ValueError naming `name`."""
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")
    return mode


class PendingChecks:
    """Value checks computed on the device, not yet read: messages and their flags
    ([len(messages)] bool, True where violated)."""

    def __init__(self, messages: list[str], flags: torch.Tensor):
        self.messages, self.flags = list(messages), flags

    def add(self, message: str, flag: torch.Tensor) -> None:
        """One more check: flag [] bool, True where violated."""
        self.messages.append(message)
        self.flags = torch.cat([self.flags, flag.reshape(1)])

    def read(self, counts: torch.Tensor | None = None) -> list[int]:
        """Raises ValueError with the first violated message; returns `counts` ([N] integer)
        as ints. One read back to the host for all of it."""
        flags = self.flags.long()
        values = flags if counts is None else torch.cat([flags, counts.long()])
        found = values.tolist()  # the read
        for message, bad in zip(self.messages, found):
            if bad:
                raise ValueError(message)
        return found[len(self.messages) :]


def _span_violations(model, input_ids, attention_mask, score_mask, answer_mask):
    """Each row is one contiguous run of real tokens holding the score span and, after it,
    the answer span; anything else would score padding or read logits nobody defined.
    Returns PendingChecks (nothing is read)."""
    padding = ~attention_mask
    starts = attention_mask.clone()  # the first real token of each run
    starts[:, 1:] &= padding[:, :-1]
    vocab = vocab_size(model)
    elementwise = {
        "score_mask must lie inside attention_mask (it is set on padding)": score_mask & padding,
        "answer_mask must lie inside attention_mask (it is set on padding)": answer_mask & padding,
        "score_mask and answer_mask must not overlap: the answer comes after the score span "
        "(SPEC section 2)": score_mask & answer_mask,
        "answer_mask must not cover a row's first real token: no position predicts it": (
            answer_mask & starts
        ),
        f"input_ids must lie in [0, {vocab}), the model's vocabulary": (input_ids < 0)
        | (input_ids >= vocab),
    }
    messages = [
        "attention_mask must mark one contiguous run of real tokens per row "
        "(left or right padding)",
        *elementwise,
    ]
    runs = (starts.sum(dim=1) > 1).any()
    flags = torch.cat([runs[None], torch.stack(list(elementwise.values())).flatten(1).any(dim=1)])
    return PendingChecks(messages, flags)


def check_batch(model, input_ids, attention_mask, score_mask, answer_mask, mode):
    """Checks what both importance ops take. Returns the bool (attention, score, answer) masks
    and the value checks as PendingChecks, for the op to read with its own facts at once.

    Raised here (TypeError for a wrong type, ValueError naming the argument): input_ids
    int64/int32 [B, T]; masks bool or integer [B, T]; everything on the model's device; mode
    one of MODES. Pending (ValueError when read): input_ids inside the model's vocabulary;
    each row's real tokens one contiguous run; score_mask and answer_mask inside
    attention_mask and disjoint (the answer follows the score span); answer_mask off each
    row's first real token (no logits predict it). answer_mask None means no row has an
    answer span (every row uses `last`).
    """
    require_causal_lm(model)
    require_token_ids("input_ids", input_ids)
    shape = input_ids.shape
    attention_mask = require_mask("attention_mask", attention_mask, shape)
    score_mask = require_mask("score_mask", score_mask, shape)
    answer_mask = (
        torch.zeros_like(score_mask)
        if answer_mask is None
        else require_mask("answer_mask", answer_mask, shape)
    )
    require_same_device(
        input_ids=input_ids,
        attention_mask=attention_mask,
        score_mask=score_mask,
        answer_mask=answer_mask,
        model=model.get_input_embeddings().weight,
    )
    require_mode("mode", mode)
    masks = (attention_mask, score_mask, answer_mask)
    return masks, _span_violations(model, input_ids, *masks)


def outcome_positions(attention_mask, answer_mask, mode):
    """Per row, the position whose logits `last` reads, and whether the row uses `last`
    (mode == "last", or no answer span). Returns ([B] long, [B] bool)."""
    has_answer = answer_mask.any(dim=1)
    uses_last = ~has_answer if mode != "last" else torch.ones_like(has_answer)
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    first_answer = torch.where(answer_mask, columns, attention_mask.shape[1]).amin(dim=1)
    last_real = torch.where(attention_mask.bool(), columns, -1).amax(dim=1)
    # `last` reads z_{a0 - 1}, the logits predicting the first answer token; without an
    # answer span, the logits of the last real token.
    last_pos = torch.where(has_answer, first_answer - 1, last_real)
    return last_pos, uses_last


def require_finite_scores(scores: torch.Tensor, cause: str) -> None:
    """Finite inputs must not give NaN scores silently: an overflow in the model is an error."""
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"importance scores came out non-finite (NaN or Inf): {cause}")
