"""Reasoning and answer spans of completions (SPEC section 2): which tokens get scored
(`score_mask`) and which carry the final answer (`answer_mask`).

The completion is decoded, the answer is found in the text (`\\boxed{...}`, `#### 42`,
`<answer>...</answer>` or a user regex with one group), and characters map back to tokens
through offset mappings. Tokens before the answer's markup are the reasoning span; tokens
overlapping the answer's content are the answer span. A completion without an answer gets an
empty answer span (the importance ops then use the `last` mode) and a reasoning span over the
whole completion.
"""

from __future__ import annotations

import re

import torch

from oar_kernels._checks import require_mask, require_tensor

# Named formats: a regex whose group 1 is the answer, matched at its last occurrence.
ANSWER_FORMATS = {
    "gsm8k": re.compile(r"####\s*(\S(?:.*\S)?)\s*$", re.MULTILINE),
    "answer_tag": re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL),
}


def _last_boxed(text: str) -> tuple[int, int, int] | None:
    """(markup start, content start, content end) of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    content = start + len("\\boxed{")
    depth = 1
    for i in range(content, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return start, content, i
    return None


def find_answer(text: str, answer_format) -> tuple[int, int, int] | None:
    """(markup start, answer start, answer end) character offsets of the final answer.

    answer_format: "boxed", "gsm8k" (#### 42), "answer_tag" (<answer>...</answer>), or a
    regex (str or compiled) whose group 1 is the answer. The last match wins.
    """
    if answer_format == "boxed":
        return _last_boxed(text)
    pattern = ANSWER_FORMATS.get(answer_format, answer_format)
    if isinstance(pattern, str):
        pattern = re.compile(pattern)
    if not isinstance(pattern, re.Pattern) or pattern.groups < 1:
        raise ValueError(
            f"answer_format must be one of {['boxed', *ANSWER_FORMATS]} or a regex with a group, "
            f"got {answer_format!r}"
        )
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return last.start(0), last.start(1), last.end(1)


def token_char_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `ids` and each token's [start, end) characters in it.

    Uses the tokenizer's offset mapping when re-encoding the text gives back the same ids;
    otherwise decodes prefixes (exact for any tokenizer, quadratic in the length).
    """
    text = tokenizer.decode(ids)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        encoded = None
    if encoded is not None and list(encoded["input_ids"]) == list(ids):
        return text, [tuple(span) for span in encoded["offset_mapping"]]
    spans, previous = [], 0
    for k in range(len(ids)):
        end = len(tokenizer.decode(ids[: k + 1]))
        spans.append((previous, end))
        previous = end
    return text, spans


def completion_spans(
    tokenizer,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    answer_format="boxed",
) -> tuple[torch.Tensor, torch.Tensor]:
    """score_mask and answer_mask [B, T] bool for padded prompt + completion batches.

    input_ids: [B, T]; completion_mask: [B, T] bool/int, the completion tokens (padding and
    prompt excluded). Returns (score_mask, answer_mask).
    """
    require_tensor("input_ids", input_ids)
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(
            f"input_ids must be an integer [B, T] tensor, got {tuple(input_ids.shape)}"
        )
    completion_mask = require_mask("completion_mask", completion_mask, input_ids.shape)
    score_mask = torch.zeros_like(completion_mask)
    answer_mask = torch.zeros_like(completion_mask)
    for b in range(input_ids.shape[0]):
        (cols,) = completion_mask[b].nonzero(as_tuple=True)
        if cols.numel() == 0:
            continue
        text, spans = token_char_spans(tokenizer, input_ids[b, cols].tolist())
        found = find_answer(text, answer_format)
        if found is None:
            score_mask[b, cols] = True
            continue
        markup, start, end = found
        starts = torch.tensor([s for s, _ in spans])
        ends = torch.tensor([e for _, e in spans])
        score_mask[b, cols] = (ends <= markup).to(score_mask.device)
        answer_mask[b, cols] = ((starts < end) & (ends > start)).to(answer_mask.device)
    return score_mask, answer_mask
