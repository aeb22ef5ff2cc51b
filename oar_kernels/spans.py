"""Reasoning and answer spans of completions (SPEC section 2): which tokens get scored
(`score_mask`) and which carry the final answer (`answer_mask`).

The completion is decoded, the answer is found in the text (`\\boxed{...}`, `#### 42`,
`<answer>...</answer>` or a user regex with one group), and characters map back to tokens
through offset mappings (or, without them, prefix decoding). Tokens before the answer's markup
are the reasoning span; tokens overlapping the answer's content are the answer span. A
completion without an answer gets an empty answer span (the importance ops then use the `last`
mode) and a reasoning span over the whole completion.
"""

from __future__ import annotations

import os
import re

import torch

from oar_kernels._checks import require_int, require_mask, require_tensor

_NON_SPACE = re.compile(r"\S")  # Python's \s is str.isspace, so the scanners agree with it
_BRACE = re.compile(r"[{}]")


def _skip_space(text: str, i: int) -> int:
    """Index of the first non-whitespace character at or after i (len(text) if none)."""
    found = _NON_SPACE.search(text, i)
    return found.start() if found else len(text)


def _strip_end(text: str, start: int, end: int) -> int:
    """End of text[start:end] once its trailing whitespace is dropped."""
    return start + len(text[start:end].rstrip())


def _last_boxed(text: str) -> tuple[int, int, int] | None:
    """The last \\boxed{...}, braces balanced; None if that last one never closes."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    content = start + len("\\boxed{")
    depth = 1
    for brace in _BRACE.finditer(text, content):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return start, content, brace.start()
    return None


def _last_gsm8k(text: str) -> tuple[int, int, int] | None:
    """The last `#### answer`: the answer runs from the first non-space after the marker (on
    this or a later line) to that line's last non-space, so it may contain `####` itself.

    Scans forward like the regex `####\\s*(\\S(?:.*\\S)?)\\s*$` (multiline) did, each character
    visited a bounded number of times.
    """
    found, pos = None, 0
    while (marker := text.find("####", pos)) >= 0:
        start = _skip_space(text, marker + len("####"))
        if start == len(text):  # only whitespace is left, so no later marker either
            break
        line_end = text.find("\n", start)
        end = _strip_end(text, start, len(text) if line_end < 0 else line_end)
        found, pos = (marker, start, end), end
    return found


def _last_answer_tag(text: str) -> tuple[int, int, int] | None:
    """The last `<answer>...</answer>`, content stripped of surrounding whitespace; an opener
    pairs with the first closer after it.

    Scans forward like the regex `<answer>\\s*(.*?)\\s*</answer>` (dotall) did, without its
    cubic backtracking on unclosed openers.
    """
    found, pos = None, 0
    while (opener := text.find("<answer>", pos)) >= 0:
        content = opener + len("<answer>")
        closer = text.find("</answer>", content)
        if closer < 0:  # no later opener can close either
            break
        start = _skip_space(text, content)  # stops at the closer's "<" at the latest
        found, pos = (opener, start, _strip_end(text, start, closer)), closer + len("</answer>")
    return found


# Built-in formats, each a linear-time scan for the last answer in a completion.
BUILTIN_FORMATS = {"boxed": _last_boxed, "gsm8k": _last_gsm8k, "answer_tag": _last_answer_tag}


def _last_regex_match(
    text: str, answer_format, max_chars: int | None
) -> tuple[int, int, int] | None:
    """(markup start, group 1 start, group 1 end) of a user regex's last match whose group 1
    takes part (`(a)|b` matching "b" has no answer), or None."""
    pattern = re.compile(answer_format) if isinstance(answer_format, str) else answer_format
    if not isinstance(pattern, re.Pattern) or pattern.groups < 1:
        raise ValueError(
            f"answer_format must be one of {list(BUILTIN_FORMATS)} or a regex with a group, "
            f"got {answer_format!r}"
        )
    first = 0 if max_chars is None else max(0, len(text) - max_chars)
    found = None
    for match in pattern.finditer(text, first):
        if match.start(1) >= 0:
            found = match.start(0), match.start(1), match.end(1)
    return found


def find_answer(
    text: str, answer_format, *, max_chars: int | None = None
) -> tuple[int, int, int] | None:
    """(markup start, answer start, answer end) character offsets of the final answer.

    answer_format: "boxed" (\\boxed{...}, braces balanced), "gsm8k" (#### 42), "answer_tag"
    (<answer>...</answer>), or a regex (str or compiled) whose group 1 is the answer. The last
    match wins (for a regex, the last one in which group 1 takes part). The built-in formats
    are scanned in linear time on any text.

    A user regex runs on Python's backtracking `re`: patterns with adjacent or nested
    quantifiers over overlapping characters (say `(.*?)\\s*$` or `(a+)+`) can take polynomial
    or exponential time on adversarial completions. max_chars (user regexes only) bounds that
    cost: matches are then searched for only in the last max_chars characters (offsets stay
    relative to the whole text; lookbehinds and `\\b` still see the characters before). Answers
    sit at the end of completions, so a cap of a few thousand characters rarely changes results.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if max_chars is not None:
        max_chars = require_int("max_chars", max_chars, 1)
    if isinstance(answer_format, str) and answer_format in BUILTIN_FORMATS:
        return BUILTIN_FORMATS[answer_format](text)
    return _last_regex_match(text, answer_format, max_chars)


# Tokens decoded before the newest one in prefix decoding: more than a UTF-8 character split
# over byte tokens (up to 4) or a decoder treating a text's first token specially can reach.
_DECODE_CONTEXT = 8


def _settled_end(text: str, window_text: str, base: int, low: int) -> int:
    """End of the decoded prefix's leading characters that equal the whole text's, given that
    those before `low` do. The window's text sits at `base` and only its head (before `low`)
    may differ from the prefix's."""
    tail = window_text[low - base :]
    return low + len(os.path.commonprefix([tail, text[low : low + len(tail)]]))


def _leading_replacements(text: str) -> int:
    """How many U+FFFD text starts with."""
    return len(text) - len(text.lstrip("\ufffd"))


def _continues_previous_character(tokenizer, token: int, added: str) -> bool:
    """Whether the token's first bytes belong to the character before it: decoded alone they
    are U+FFFD (stray continuation bytes) that the decoding does not add. Catches what
    comparing with the text cannot: the tail bytes of a U+FFFD the text holds itself."""
    return _leading_replacements(tokenizer.decode([token])) > _leading_replacements(added)


def _prefix_decoding_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Each token's [start, end) characters: a token belongs to every character it has bytes
    of, as in an offset mapping.

    Token k ends at len(decode(ids[:k + 1])) and starts where the characters of ids[:k] that
    are already final (equal to the whole text's) end: a character split over byte tokens
    decodes as U+FFFD until complete, so every token with bytes of it spans it. Spans are
    never backwards.

    Linear, O(len(ids) * _DECODE_CONTEXT): rather than decode every prefix (quadratic), decode a
    window ids[window:k + 1]. Once the window holds _DECODE_CONTEXT tokens its text differs
    from the prefix's only in a fixed head (a partial UTF-8 character decoded as U+FFFD, a
    stripped leading space), so the prefix ends at `base + len(window text)`. When the window
    reaches 2 * _DECODE_CONTEXT tokens it restarts _DECODE_CONTEXT back, its base set from the
    last token's end. Exact whenever a token changes the decoding of fewer than _DECODE_CONTEXT
    tokens around it, as byte-level BPE, SentencePiece (Metaspace) and WordPiece decoders do;
    the tests compare it with decoding every prefix.
    """
    text = tokenizer.decode(ids)
    spans, window, base, settled, before = [], 0, 0, 0, ""
    for k, token in enumerate(ids):
        last_end = base + len(before)
        if k - window >= 2 * _DECODE_CONTEXT:
            window = k - _DECODE_CONTEXT
            before = tokenizer.decode(ids[window:k])
            base = last_end - len(before)
        current = tokenizer.decode(ids[window : k + 1])
        start = settled
        if _continues_previous_character(tokenizer, token, current[len(before) :]):
            start = min(start, max(last_end - 1, 0))
        end = base + len(current)
        spans.append((start, max(start, end)))
        # Final characters stay final, so only the window's new tail is compared: linear.
        settled = _settled_end(text, current, base, max(base, min(settled, end)))
        before = current
    return spans


def _offset_mapping(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]] | None:
    """The tokenizer's offset mapping of `text`, or None unless re-encoding gives back `ids`.

    Slow (Python) tokenizers have no offsets: transformers 4 raises, 5 leaves them out.
    """
    if getattr(tokenizer, "is_fast", True) is False:
        return None
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    if "offset_mapping" not in encoded or list(encoded["input_ids"]) != ids:
        return None
    return [tuple(span) for span in encoded["offset_mapping"]]


def _require_tokenizer(tokenizer) -> None:
    """Fail early, naming the argument, on a tokenizer that cannot decode ids."""
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(
            "tokenizer must have a decode method (a transformers tokenizer), "
            f"got {type(tokenizer).__name__}"
        )


def token_char_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `ids` and each token's [start, end) characters in it.

    Uses the tokenizer's offset mapping when it has one and re-encoding the text gives back the
    same ids; otherwise (slow tokenizers, non-canonical ids) prefix decoding, linear in the
    length (see _prefix_decoding_spans). Either way a token spans every character it has bytes
    of, so a character split over tokens is in each of their spans.
    """
    _require_tokenizer(tokenizer)
    ids = list(ids)
    text = tokenizer.decode(ids)
    offsets = _offset_mapping(tokenizer, text, ids)
    return text, offsets if offsets is not None else _prefix_decoding_spans(tokenizer, ids)


def completion_spans(
    tokenizer,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    answer_format="boxed",
    max_chars: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """score_mask and answer_mask [B, T] bool for padded prompt + completion batches.

    input_ids: [B, T]; completion_mask: [B, T] bool/int, the completion tokens (padding and
    prompt excluded). answer_format and max_chars: as in find_answer. Returns
    (score_mask, answer_mask).

    A token belongs to every character it has bytes of (token_char_spans): one holding bytes of
    both the reasoning (or markup) and the answer is in the answer span only, so the answer mask
    holds every byte of the answer; the reasoning span is the tokens wholly before the markup.
    """
    _require_tokenizer(tokenizer)
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
        found = find_answer(text, answer_format, max_chars=max_chars)
        if found is None:
            score_mask[b, cols] = True
            continue
        markup, start, end = found
        starts = torch.tensor([s for s, _ in spans])
        ends = torch.tensor([e for _, e in spans])
        score_mask[b, cols] = (ends <= markup).to(score_mask.device)
        answer_mask[b, cols] = ((starts < end) & (ends > start)).to(answer_mask.device)
    return score_mask, answer_mask
