"""OAR-P: counterfactual token masking with shared prefixes (SPEC sections 2, 3, 4).

Counterfactual s (token s replaced by `mask_token_id`) shares the prefix x_<s with the
original, so it reuses the original's KV cache for positions < s and recomputes only
positions >= s. Counterfactuals of a row run in micro-batches bounded by `max_batch_tokens`:
each holds a copy of the row's cache, its recomputed suffixes (right-padded), an attention
mask that hides cache positions >= s, and position ids s, s+1, ... Only the outcome
positions' hidden states reach the lm head (token_logprobs for the joint mode, [K, V] logits
at one position otherwise): no [R, T, V] logits.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch

from oar_kernels._checks import require_bool, require_int
from oar_kernels.importance.gradient import (
    MODES,
    check_batch,
    eval_mode,
    lm_head_parameters,
    outcome_positions,
    require_finite_scores,
    vocab_size,
)
from oar_kernels.logprobs import token_logprobs


@dataclass
class PerturbationStats:
    token_forwards: int  # tokens the decoder computed (originals + recomputed suffixes)
    naive_token_forwards: int  # what R full forwards per row would compute (R * L)


def _cache_keyword(decoder) -> str:
    # transformers renamed `past_key_values` to `cache` (5.x deprecation); accept both.
    return (
        "cache" if "cache" in inspect.signature(decoder.forward).parameters else ("past_key_values")
    )


def _outcome(model, hidden_at, targets, row_mode):
    """Outcome of one or more sequences from hidden states at the outcome positions.

    row_mode "answer_joint": hidden_at [K, A, H], targets [A] -> phi [K] (mean answer logprob).
    row_mode "answer_mean": hidden_at [K, A, H] -> log P [K, V] of the mean logits.
    row_mode "last": hidden_at [K, 1, H] -> log P [K, V].
    """
    weight, bias = lm_head_parameters(model)
    if row_mode == "answer_joint":
        rows, answers, width = hidden_at.shape
        logp = token_logprobs(hidden_at.reshape(-1, width), weight, targets.repeat(rows), bias=bias)
        return logp.reshape(rows, answers).mean(dim=1)
    # The lm head is affine: the mean of the logits is the head of the mean hidden state.
    logits = torch.nn.functional.linear(hidden_at.mean(dim=1), weight, bias)
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)


def _row_importance(
    model,
    ids,
    scored,
    outcome_pos,
    answer_targets,
    row_mode,
    mask_token_id,
    max_batch_tokens,
    cache_keyword,
):
    """Importance [R] of the scored positions of one unpadded row, and the tokens computed."""
    decoder = model.get_decoder()
    length = ids.shape[0]
    original = decoder(input_ids=ids[None], use_cache=True)
    cache = getattr(original, "cache", None)
    cache = original.past_key_values if cache is None else cache
    hidden = original.last_hidden_state[0]
    clean = _outcome(model, hidden[outcome_pos][None], answer_targets, row_mode)[0]
    importance = torch.empty(len(scored), dtype=clean.dtype, device=ids.device)
    computed = length
    # Each counterfactual costs its suffix plus a copy of the row's cache.
    per_item = 2 * length
    group = max(1, max_batch_tokens // per_item)
    for start in range(0, len(scored), group):
        s = scored[start : start + group]
        count = s.shape[0]
        suffix = length - int(s.min())
        cols = torch.arange(suffix, device=ids.device)
        positions = s[:, None] + cols[None, :]  # [K, suffix]
        valid = positions < length
        positions = positions.clamp(max=length - 1)
        new_ids = torch.where(positions == s[:, None], mask_token_id, ids[positions])
        keys = torch.arange(length, device=ids.device)
        attention = torch.cat([keys[None, :] < s[:, None], valid], dim=1).long()
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(count)
        out = decoder(
            input_ids=new_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            **{cache_keyword: batch_cache},
        )
        computed += int(valid.sum())
        # Outcome positions before s are unchanged: read them from the original.
        rel = outcome_pos[None, :] - s[:, None]
        rows = torch.arange(count, device=ids.device)[:, None]
        changed = out.last_hidden_state[rows, rel.clamp(min=0)]
        at = torch.where((rel >= 0)[..., None], changed, hidden[outcome_pos][None])
        counterfactual = _outcome(model, at, answer_targets, row_mode)
        if row_mode == "answer_joint":
            importance[start : start + count] = clean - counterfactual
        else:
            importance[start : start + count] = (clean.exp() * (clean - counterfactual)).sum(-1)
    return importance, computed


def _score_rows(
    model, input_ids, attention_mask, score_mask, answer_mask, mode, mask_token_id, max_batch_tokens
):
    """Scores [B, T] float32 of a validated batch, row by row (each row unpadded), and stats."""
    scores = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    stats = PerturbationStats(0, 0)
    if scores.numel() == 0:  # nothing to score, and no outcome position to find
        return scores, stats
    cache_keyword = _cache_keyword(model.get_decoder())
    last_pos, uses_last = outcome_positions(attention_mask.long(), answer_mask, mode)
    for b in range(input_ids.shape[0]):
        (real,) = attention_mask[b].nonzero(as_tuple=True)
        if real.numel() == 0 or not score_mask[b].any():
            continue
        offset = int(real[0])
        ids = input_ids[b, real]
        (scored,) = score_mask[b, real].nonzero(as_tuple=True)
        row_mode = "last" if bool(uses_last[b]) else mode
        if row_mode == "last":
            outcome_pos = (last_pos[b] - offset).reshape(1)
            answer_targets = None
        else:
            (answer,) = answer_mask[b, real].nonzero(as_tuple=True)
            outcome_pos, answer_targets = answer - 1, ids[answer]
        importance, computed = _row_importance(
            model,
            ids,
            scored,
            outcome_pos,
            answer_targets,
            row_mode,
            mask_token_id,
            max_batch_tokens,
            cache_keyword,
        )
        scores[b, scored + offset] = importance.float()
        stats.token_forwards += computed
        stats.naive_token_forwards += len(scored) * ids.shape[0]
    return scores, stats


def perturbation_importance(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    answer_mask: torch.Tensor | None = None,
    *,
    mode: str = "last",
    mask_token_id: int,
    max_batch_tokens: int = 16384,
    return_stats: bool = False,
):
    """OAR-P token importance for a padded batch (SPEC section 4).

    model: a Hugging Face causal LM; input_ids, attention_mask, score_mask, answer_mask:
    [B, T], left or right padded; the batch rules of `check_batch` hold (ValueError otherwise).
    B = 0 or T = 0 gives empty scores.
    mode: "last" / "answer_mean" (KL(P(x) || P(x^(s)))) or "answer_joint" (phi(x) - phi(x^(s)),
    signed); rows without an answer span use "last". mask_token_id: the substitute token.
    max_batch_tokens: bounds a micro-batch's recomputed tokens plus cached entries, so peak
    memory does not grow with the number of scored tokens R.
    Returns [B, T] float32 scores (0 outside score_mask), and PerturbationStats if asked.
    The pass runs in eval mode (dropout off) and restores every module's mode.
    """
    attention_mask, score_mask, answer_mask = check_batch(
        model, input_ids, attention_mask, score_mask, answer_mask, mode
    )
    mask_token_id = require_int("mask_token_id", mask_token_id, 0, vocab_size(model) - 1)
    max_batch_tokens = require_int("max_batch_tokens", max_batch_tokens, 1)
    require_bool("return_stats", return_stats)
    with torch.no_grad(), eval_mode(model):
        scores, stats = _score_rows(
            model,
            input_ids,
            attention_mask,
            score_mask,
            answer_mask,
            mode,
            mask_token_id,
            max_batch_tokens,
        )
    require_finite_scores(scores, "the model's outputs overflowed or its weights are not finite")
    return (scores, stats) if return_stats else scores


__all__ = ["MODES", "PerturbationStats", "perturbation_importance"]
