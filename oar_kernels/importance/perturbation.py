"""OAR-P: counterfactual token masking with shared prefixes (SPEC sections 2, 3, 4).

Counterfactual s (token s of a row replaced by `mask_token_id`) shares the prefix x_<s with
the original, so it reads the original's KV cache for positions < s and recomputes only the
positions s .. e, e being the row's last outcome position (later tokens cannot move the
outcome; a token scored after e scores exactly 0).

The pass, for the whole batch at once:
1. The masks are read to the host once and every micro-batch is planned there: the
   counterfactuals of all rows, sorted by suffix length, packed greedily under a memory
   budget (`max_batch_bytes`, estimated from the model config by `counterfactual_bytes`).
2. One clean forward (row groups under the same budget) keeps the KV cache, flattened per
   layer to [rows * T, kv_heads, head_dim], and the hidden states at the outcome positions.
3. Each micro-batch is one decoder call: one index_select per layer gathers every
   counterfactual's prefix from the clean cache, right-aligned (so key index distances are
   position distances, which sliding-window masks rely on), and the suffixes follow it with
   positions s, s+1, ... The outcome reads only the outcome positions (the clean pass's where
   they precede s): no [R, T, V] logits. Nothing in the loop reads a value back to the host,
   and its op count does not depend on how many rows or counterfactuals a micro-batch holds.

Cheaper variants (opt-in; the default is exact per-token OAR-P): `stride=k` runs the
counterfactuals of every k-th scored token of a row and gives each other token the score of
its nearest exactly scored one; `segments=` masks every scored token of a segment at once
(one counterfactual per segment, sharing the prefix before its first token) and gives its
tokens the segment's score. `importance.variants` builds segments and holds the hybrid.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import numpy as np
import torch

from oar_kernels._checks import require_bool, require_int, require_same_device, require_tensor
from oar_kernels.importance.batch import check_batch, outcome_positions, require_finite_scores
from oar_kernels.importance.causal_lm import (
    eval_mode,
    head_logits,
    logit_transform,
    position_ids_from,
    vocab_size,
)

# The default memory budget of one micro-batch (and of one group of the clean forward).
DEFAULT_MAX_BATCH_BYTES = 1 << 30

# Padded suffix tokens a micro-batch may compute beyond its real ones, as a fraction of
# those, by device type. A CPU pays for every padded token; a GPU pays mostly per decoder
# call (its kernel launches), so there fewer, fuller micro-batches win.
PADDING_SLACK = {"cpu": 0.125}
DEFAULT_PADDING_SLACK = 1.0


@dataclass(frozen=True)
class _Limits:
    bytes: int  # max_batch_bytes
    tokens: int  # max_batch_tokens (recomputed tokens plus cached entries)
    padding: float  # PADDING_SLACK of the device


# Outcome kinds: a KL between outcome distributions, or the joint answer logprob phi.
_KL, _JOINT = 0, 1


@dataclass
class PerturbationStats:
    token_forwards: int  # real tokens the decoder computed (clean rows + recomputed suffixes)
    naive_token_forwards: int  # what R full forwards per row would compute (R * L)
    micro_batches: int = 0  # decoder calls on counterfactuals
    padded_token_forwards: int = 0  # token_forwards with the padding the decoder computed


# ------------------------------------------------------------------ memory estimate


@dataclass(frozen=True)
class ModelDims:
    """What the memory estimate reads from a model's config (and its weights' dtype)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    itemsize: int


def _config_int(config, names, default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def model_dims(model) -> ModelDims:
    """Dimensions from the config under Llama/Qwen names, GPT-2 names as a fallback."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    weight = model.get_input_embeddings().weight
    hidden = weight.shape[1]
    heads = _config_int(config, ("num_attention_heads", "n_head"), 1)
    return ModelDims(
        layers=_config_int(config, ("num_hidden_layers", "n_layer"), 1),
        hidden=hidden,
        intermediate=_config_int(config, ("intermediate_size", "n_inner"), 4 * hidden),
        heads=heads,
        kv_heads=_config_int(config, ("num_key_value_heads",), heads),
        head_dim=_config_int(config, ("head_dim",), max(1, hidden // heads)),
        vocab=model.get_output_embeddings().weight.shape[0],
        itemsize=weight.element_size(),
    )


def counterfactual_bytes(dims: ModelDims, cached: int, suffix: int, outcomes: int) -> int:
    """Peak bytes one sequence of a micro-batch adds: `cached` prefix entries, `suffix`
    recomputed tokens, `outcomes` outcome positions.

    The KV cache of every layer (prefix and suffix) lives through the call, plus one layer's
    concatenation in flight; per layer, the residual stream and norms, q/k/v with their
    rotated copies, the MLP's three intermediate tensors, and attention scores and
    probabilities (for backends that materialise them); the mask; float32 logits rows at the
    outcome positions with their log-softmax and the KL's product.
    """
    keys = cached + suffix
    kv = (dims.layers + 1) * 2 * dims.kv_heads * dims.head_dim * keys
    qkv = 2 * (dims.heads + 2 * dims.kv_heads) * dims.head_dim
    activations = suffix * (4 * dims.hidden + qkv + 3 * dims.intermediate)
    attention = 2 * dims.heads * suffix * keys
    mask = suffix * keys
    logits = 3 * 4 * outcomes * dims.vocab
    return dims.itemsize * (kv + activations + attention + mask) + logits


# ------------------------------------------------------------------ the plan (host side)


@dataclass
class _Plan:
    """What the pass does, decided on the host from the masks before any model call."""

    width: int  # columns the clean forward computes (up to the last outcome position)
    row_groups: list  # clean-forward groups: (start, end) over the planned rows
    batches: list  # micro-batches: (start, end, cached, suffix, kind) over the counterfactuals
    device_ints: dict  # name -> int64 array the device slices (uploaded in one transfer)
    segmented: bool  # counterfactuals mask segments (`masked_by`), not only their first token
    token_forwards: int
    naive_token_forwards: int
    padded_token_forwards: int


def _outcome_columns(answer, last_pos, uses_last):
    """Per row, the columns whose hidden states the outcome reads ([B, A], padded with the
    first) and which of them count ([B, A] bool): a0 - 1 or the last real token for rows
    that use `last`, every answer column - 1 otherwise."""
    width = answer.shape[1]
    answer = answer & ~uses_last[:, None]
    count = max(1, int(answer.sum(1).max(initial=0)))
    ordered = np.sort(np.where(answer, np.arange(width), width), axis=1)[:, :count]
    valid = ordered < width
    first = np.where(uses_last, last_pos, ordered[:, 0] - 1)
    columns = np.where(valid, ordered - 1, first[:, None])
    valid[:, 0] = True  # a `last` row's one position
    return columns, valid


def _micro_batches(cached, suffix, kinds, dims, outcomes, limits):
    """Greedy packing of the (sorted) counterfactuals: (start, end, cached, suffix, kind) with
    padded sizes; a micro-batch holds one outcome kind, stays within `limits` (one
    counterfactual at least) and computes at most (1 + limits.padding) times its real suffix
    tokens. Padding to at least one cache and two suffix columns keeps the model's mask
    builder off its no-mask shortcut, which reads the mask back to the host."""
    batches, start, top_cached, top_suffix, real = [], 0, 1, 2, 0
    for item in range(len(cached)):
        grown = max(top_cached, int(cached[item])), max(top_suffix, int(suffix[item]))
        real += max(2, int(suffix[item]))
        count = item - start + 1
        if count > 1 and (
            kinds[item] != kinds[start]
            or count * counterfactual_bytes(dims, *grown, outcomes) > limits.bytes
            or count * sum(grown) > limits.tokens
            or count * grown[1] > (1 + limits.padding) * real
        ):
            batches.append((start, item, top_cached, top_suffix, int(kinds[start])))
            start, real = item, max(2, int(suffix[item]))
            grown = max(1, int(cached[item])), max(2, int(suffix[item]))
        top_cached, top_suffix = grown
    if len(cached):
        batches.append((start, len(cached), top_cached, top_suffix, int(kinds[start])))
    return batches


@dataclass(frozen=True)
class _Variant:
    stride: int = 1
    segments: np.ndarray | None = None  # [B, T] int64 segment ids, read to the host


def _groups(tok_row, tok_col, variant):
    """Which counterfactual each scored token (row-major) takes its score from, and whether
    that counterfactual masks it: (group [N] in 0..G-1, masked [N] bool)."""
    count = tok_row.size
    if variant.segments is not None:
        keys = np.stack([tok_row, variant.segments[tok_row, tok_col]], 1)
        return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1), np.ones(count, bool)
    k = variant.stride
    row_start = np.searchsorted(tok_row, tok_row)  # each token's row's first token
    rank = np.arange(count) - row_start
    row_end = np.searchsorted(tok_row, tok_row, side="right") - 1
    last_kept = (row_end - row_start) // k * k
    nearest = np.minimum((rank + k // 2) // k * k, last_kept)  # ties go to the later one
    return np.unique(row_start + nearest, return_inverse=True)[1], rank % k == 0


def _plan(host, mode, dims, limits, variant=_Variant()) -> _Plan:
    attention, score, answer, last_pos, uses_last = host
    width = attention.shape[1]
    first, length = attention.argmax(1), attention.sum(1)
    columns, valid = _outcome_columns(answer, last_pos, uses_last)
    last = columns.max(1)
    # Scored token (b, c): a scored column c up to the row's last outcome column.
    tok_row, tok_col = np.nonzero(score & (np.arange(width) <= last[:, None]))
    exact = variant.stride == 1 and variant.segments is None
    if exact:  # counterfactual i masks token i
        cf_row, cf_col = tok_row, tok_col
    else:  # counterfactual g masks its masked tokens, from the first of them on
        group, masked = _groups(tok_row, tok_col, variant)
        cf_col = np.full(group.max(initial=-1) + 1, width)
        np.minimum.at(cf_col, group[masked], tok_col[masked])
        cf_row = np.zeros_like(cf_col)
        cf_row[group] = tok_row
    rows, cf_sub = np.unique(cf_row, return_inverse=True)
    cf_pos, cf_suffix = cf_col - first[cf_row], last[cf_row] - cf_col + 1
    cf_kind = np.where((mode == "answer_joint") & ~uses_last[cf_row], _JOINT, _KL)
    # By kind, then longest suffix first: neighbours have nearly equal suffixes (little padding).
    order = np.lexsort((cf_pos, -cf_suffix, cf_kind))
    batches = _micro_batches(
        cf_pos[order],
        cf_suffix[order],
        cf_kind[order],
        dims,
        columns.shape[1],
        limits,
    )
    variant_ints = {}
    if not exact:
        sorted_index = np.empty_like(order)
        sorted_index[order] = np.arange(order.size)
        variant_ints = {"tok_flat": tok_row * width + tok_col, "tok_src": sorted_index[group]}
        if variant.segments is not None:  # per cell of [B, T]: the counterfactual masking it
            masked_by = np.full(attention.size, -1)
            masked_by[variant_ints["tok_flat"]] = variant_ints["tok_src"]
            variant_ints["masked_by"] = masked_by
    clean_width = int(last[rows].max()) + 1 if rows.size else 0
    row_bytes = counterfactual_bytes(dims, 0, clean_width, columns.shape[1])
    per_group = max(1, limits.bytes // row_bytes)
    rows_first = first[rows]
    return _Plan(
        width=clean_width,
        row_groups=[(g, min(g + per_group, rows.size)) for g in range(0, rows.size, per_group)],
        batches=batches,
        device_ints={
            "rows": rows,
            "first": rows_first,
            "last": last[rows] - rows_first,  # row-local last outcome position
            "outcome_pos": columns[rows] - rows_first[:, None],
            "outcome_valid": valid[rows],
            # Answer token t is predicted at t - 1 (clamped: a `last` row's column may end it).
            "targets": rows[:, None] * width + np.minimum(columns[rows] + 1, width - 1),
            "cf_sub": cf_sub[order],
            "cf_pos": cf_pos[order],
            "cf_flat": (cf_row * width + cf_col)[order],  # where each score goes in [B, T]
            **variant_ints,
        },
        segmented=variant.segments is not None,
        token_forwards=int(
            np.minimum(length[rows], clean_width - rows_first).sum() + cf_suffix.sum()
        ),
        naive_token_forwards=int((score.sum(1) * length).sum()),
        padded_token_forwards=rows.size * clean_width
        + sum((end - start) * suffix for start, end, _, suffix, _ in batches),
    )


def _checked_batch(model, input_ids, attention_mask, score_mask, answer_mask, mode, segments=None):
    """`check_batch`, with the masks and outcome positions the plan needs read back to the
    host in the same transfer: the pass's one read. Returns the device masks (bool) and
    the host arrays (attention, score, answer [B, T] bool, last_pos [B], uses_last [B]),
    plus the segment ids [B, T] int64 when `segments` is given."""
    masks, checks = check_batch(model, input_ids, attention_mask, score_mask, answer_mask, mode)
    attention_mask, score_mask, answer_mask = masks
    if attention_mask.numel() == 0:  # no outcome positions to find (and nothing to plan)
        checks.read()
        return masks, None
    last_pos, uses_last = outcome_positions(attention_mask, answer_mask, mode)
    # Each cell's three mask bits in one int.
    cells = attention_mask.long() + 2 * score_mask.long() + 4 * answer_mask.long()
    parts = [cells.flatten(), last_pos.long(), uses_last.long()]
    if segments is not None:
        parts.append(segments.long().flatten())
    host = np.array(checks.read(torch.cat(parts)), dtype=np.int64)
    cells = host[: cells.numel()].reshape(cells.shape)
    last_pos, uses_last = host[cells.size : cells.size + 2 * len(last_pos)].reshape(2, -1)
    bits = [(cells >> bit & 1).astype(bool) for bit in range(3)]
    arrays = (*bits, last_pos, uses_last.astype(bool))
    if segments is not None:
        arrays += (host[cells.size + 2 * len(last_pos) :].reshape(cells.shape),)
    return masks, arrays


def _upload(arrays: dict, device) -> dict:
    """The plan's index arrays on the device: one transfer, then views of the same shapes."""
    flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays.values()]))
    flat = flat.to(device=device, dtype=torch.long)
    out, start = {}, 0
    for name, array in arrays.items():
        out[name] = flat[start : start + array.size].view(array.shape)
        start += array.size
    return out


# ------------------------------------------------------------------ the device side


def _cache_keyword(decoder) -> str:
    # transformers renamed `past_key_values` to `cache` (5.x deprecation); accept both.
    return (
        "cache" if "cache" in inspect.signature(decoder.forward).parameters else ("past_key_values")
    )


def _outcome(model, hidden_at, weights, targets, kind):
    """Outcome of sequences from the hidden states at their outcome positions, through the
    model's own logits (`head_logits`: scaled or soft-capped heads included).

    hidden_at: [K, A, H]; weights: [K, A] (1 / count on the positions that count, else 0).
    _JOINT: phi [K], the mean answer-token logprob (targets: [K, A] token ids).
    _KL: log P [K, V] of the mean logits.
    """
    if kind == _JOINT:
        logp = torch.log_softmax(head_logits(model, hidden_at), -1)
        logp = logp.gather(-1, targets[..., None])[..., 0]
        return (logp * weights.to(logp.dtype)).sum(1)
    if logit_transform(model).softcap is None:
        # An affine head: the mean of the logits is the head of the mean hidden state.
        mean = (hidden_at * weights[..., None].to(hidden_at.dtype)).sum(1)
        return torch.log_softmax(head_logits(model, mean), -1)
    logits = head_logits(model, hidden_at)
    return torch.log_softmax((logits * weights[..., None].to(logits.dtype)).sum(1), -1)


def _importance(clean, counterfactual, kind):
    """SPEC section 4: phi(x) - phi(x^(s)), or KL(P(x) || P(x^(s)))."""
    if kind == _JOINT:
        return clean - counterfactual
    return (clean.exp() * (clean - counterfactual)).sum(-1)


def _joined(parts: list) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _flat_positions(states):
    """[rows, heads, T, dim] -> [rows * T, heads, dim], a copy (index_select's source)."""
    return states.transpose(1, 2).contiguous().flatten(0, 1)


def _clean_pass(model, input_ids, attention_mask, plan, dev, cache_keyword):
    """The clean forward of the planned rows. Returns per-layer keys and values flattened to
    [rows * width, kv_heads, head_dim] (row i's position p at i * width + first_i + p), and
    the hidden states at the outcome positions [rows, A, H]."""
    decoder = model.get_decoder()
    keys, values, hidden_at = [], [], []
    for start, end in plan.row_groups:
        rows = dev["rows"][start:end]
        mask = attention_mask[rows, : plan.width].long()
        cache = _dynamic_cache()  # no config: every layer keeps every position (sliding too)
        out = decoder(
            input_ids=input_ids[rows, : plan.width],
            attention_mask=mask,
            position_ids=position_ids_from(mask),
            use_cache=True,
            **{cache_keyword: cache},
        )
        keys.append([_flat_positions(layer.keys) for layer in cache.layers])
        values.append([_flat_positions(layer.values) for layer in cache.layers])
        columns = dev["first"][start:end, None] + dev["outcome_pos"][start:end]
        local = torch.arange(end - start, device=rows.device)[:, None]
        hidden_at.append(out.last_hidden_state[local, columns])
    keys = [_joined(list(layer)) for layer in zip(*keys)]
    values = [_joined(list(layer)) for layer in zip(*values)]
    return keys, values, _joined(hidden_at), _empty_layer(cache.layers[0])


def _dynamic_cache():
    from transformers.cache_utils import DynamicCache  # transformers is not a dependency

    return DynamicCache()


def _empty_layer(layer):
    """An initialised cache layer holding nothing: the template of `_prefilled_cache`."""
    template = copy.copy(layer)
    template.keys = template.values = None
    return template


def _prefilled_cache(template, keys, values):
    """A DynamicCache whose layers hold the given [K, kv_heads, cached, head_dim] states.
    Its layers are shallow copies of an initialised one (initialising a layer creates
    tensors: ops that would count per micro-batch)."""
    cache = _dynamic_cache()
    for k, v in zip(keys, values):
        layer = copy.copy(template)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


class _Pass:
    """The device state of one call: the clean cache, the uploaded plan, the clean outcomes."""

    def __init__(self, model, input_ids, attention_mask, plan, mask_token_id):
        self.model, self.plan, self.mask_token_id = model, plan, mask_token_id
        self.keyword = _cache_keyword(model.get_decoder())
        dev = self.dev = _upload(plan.device_ints, input_ids.device)
        self.keys, self.values, self.clean_at, self.template = _clean_pass(
            model, input_ids, attention_mask, plan, dev, self.keyword
        )
        self.flat_ids = input_ids.reshape(-1)
        self.ids_base = dev["rows"] * input_ids.shape[1] + dev["first"]
        self.cache_base = torch.arange(len(dev["rows"]), device=input_ids.device)
        self.cache_base = self.cache_base * plan.width + dev["first"]
        valid = dev["outcome_valid"].double()
        self.weights = valid / valid.sum(1, keepdim=True)
        self.targets = self.flat_ids[dev["targets"]]
        # Longer than any slice taken of it: a full-length slice would skip its op, and op
        # counts would then depend on the sizes.
        longest = max(plan.width, 2, len(dev["cf_pos"])) + 1
        self.steps = torch.arange(longest, device=input_ids.device)
        kinds = {kind for *_, kind in plan.batches}
        self.clean = {
            kind: _outcome(model, self.clean_at, self.weights, self.targets, kind) for kind in kinds
        }

    def micro_batch(self, start, end, cached, suffix, kind):
        """Importance [K] of counterfactuals start..end: one decoder call, no host reads."""
        dev, count = self.dev, end - start
        rows, pos = dev["cf_sub"][start:end], dev["cf_pos"][start:end]
        last = dev["last"][rows, None]
        positions = pos[:, None] + self.steps[:suffix]  # [K, suffix]
        real = positions <= last  # suffix columns past the row's last outcome are padding
        positions = torch.minimum(positions, last)
        ids = self.flat_ids[self.ids_base[rows, None] + positions]
        ids[:, 0] = self.mask_token_id
        if self.plan.segmented:  # the rest of each counterfactual's segment
            masked_by = dev["masked_by"][self.ids_base[rows, None] + positions]
            masked = masked_by == self.steps[start:end, None]
            ids = torch.where(masked, self.mask_token_id, ids)
        # Cache column j holds position j - cached + s: the prefix ends right before s.
        prefix = self.steps[:cached] - cached + pos[:, None]  # [K, cached]
        gather = (self.cache_base[rows, None] + prefix.clamp(min=0)).flatten()
        heads, dim = self.keys[0].shape[1:]

        def gathered(layer):
            return layer.index_select(0, gather).view(count, cached, heads, dim).transpose(1, 2)

        cache = _prefilled_cache(
            self.template, map(gathered, self.keys), map(gathered, self.values)
        )
        out = self.model.get_decoder()(
            input_ids=ids,
            attention_mask=torch.cat([prefix >= 0, real], dim=1),
            position_ids=positions,
            use_cache=True,
            **{self.keyword: cache},
        )
        # Outcome positions before s are unchanged: read them from the clean pass.
        rel = dev["outcome_pos"][rows] - pos[:, None]  # [K, A]
        changed = out.last_hidden_state[self.steps[:count, None], rel.clamp(min=0)]
        at = torch.where((rel >= 0)[..., None], changed, self.clean_at[rows])
        value = _outcome(self.model, at, self.weights[rows], self.targets[rows], kind)
        return _importance(self.clean[kind][rows], value, kind)


def _score(model, input_ids, attention_mask, host, mode, mask_token_id, limits, stride=1):
    """Scores [B, T] float32 of a validated batch (host: `_checked_batch`'s arrays), and stats."""
    scores = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if scores.numel() == 0:  # nothing to score, and no outcome position to find
        return scores, PerturbationStats(0, 0)
    variant = _Variant(stride, host[5] if len(host) > 5 else None)
    plan = _plan(host[:5], mode, model_dims(model), limits, variant)
    stats = PerturbationStats(
        plan.token_forwards,
        plan.naive_token_forwards,
        len(plan.batches),
        plan.padded_token_forwards,
    )
    if not plan.batches:
        return scores, stats
    run = _Pass(model, input_ids, attention_mask, plan, mask_token_id)
    dtype = next(iter(run.clean.values())).dtype
    importance = torch.empty(len(run.dev["cf_pos"]), dtype=dtype, device=input_ids.device)
    for start, end, cached, suffix, kind in plan.batches:
        importance[start:end] = run.micro_batch(start, end, cached, suffix, kind)
    if "tok_src" in run.dev:  # a variant: each scored token takes its counterfactual's score
        scores.view(-1)[run.dev["tok_flat"]] = importance[run.dev["tok_src"]].float()
    else:
        scores.view(-1)[run.dev["cf_flat"]] = importance.float()
    return scores, stats


def _check_segments(segments, input_ids, stride) -> None:
    require_tensor("segments", segments)
    if segments.is_floating_point() or segments.is_complex() or segments.dtype == torch.bool:
        raise TypeError(f"segments must be an integer tensor, got {segments.dtype}")
    if isinstance(input_ids, torch.Tensor) and segments.shape != input_ids.shape:
        raise ValueError(
            f"segments must have input_ids' shape {tuple(input_ids.shape)}, "
            f"got {tuple(segments.shape)}"
        )
    if isinstance(input_ids, torch.Tensor):
        require_same_device(input_ids=input_ids, segments=segments)
    if stride != 1:
        raise ValueError(f"segments and stride > 1 are exclusive, got stride={stride}")


def perturbation_importance(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    answer_mask: torch.Tensor | None = None,
    *,
    mode: str = "last",
    mask_token_id: int,
    max_batch_tokens: int | None = None,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    return_stats: bool = False,
    stride: int = 1,
    segments: torch.Tensor | None = None,
):
    """OAR-P token importance for a padded batch (SPEC section 4).

    model: a Hugging Face causal LM; input_ids, attention_mask, score_mask, answer_mask:
    [B, T], left or right padded; the batch rules of `check_batch` hold (ValueError otherwise).
    B = 0 or T = 0 gives empty scores.
    mode: "last" / "answer_mean" (KL(P(x) || P(x^(s)))) or "answer_joint" (phi(x) - phi(x^(s)),
    signed); rows without an answer span use "last". mask_token_id: the substitute token.
    max_batch_bytes: the memory budget of one micro-batch of counterfactuals (all rows
    together) and of one row group of the clean forward, estimated from the model config by
    `counterfactual_bytes`; default DEFAULT_MAX_BATCH_BYTES (1 GiB). Peak memory is this
    plus the clean KV cache of the batch, whatever the number of scored tokens R.
    max_batch_tokens: optionally also bounds a counterfactual micro-batch's recomputed tokens
    plus cached entries (padding included); None: the memory budget alone.
    stride: k > 1 (opt-in, approximate) runs only the counterfactuals of each row's scored
    tokens 0, k, 2k, ... (in column order); every other scored token gets the score of the
    nearest of those in that order (the later one on a tie): about 1/k of the cost.
    segments: [B, T] integer segment ids (opt-in, approximate): the scored tokens of a row
    with equal ids are masked together by one counterfactual (its prefix is the one before
    the segment's first token), and all of them get its score; ids outside score_mask are
    ignored. `importance.variants.window_segments` / `step_segments` build them. Not with
    stride > 1. Both variants keep the rule that tokens after the last outcome position
    score 0, and the stats count only the counterfactuals they run.
    Returns [B, T] float32 scores (0 outside score_mask), and PerturbationStats if asked.
    The pass runs in eval mode (dropout off) and restores every module's mode.
    """
    stride = require_int("stride", stride, 1)
    if segments is not None:
        _check_segments(segments, input_ids, stride)
    (attention_mask, _, _), host = _checked_batch(
        model, input_ids, attention_mask, score_mask, answer_mask, mode, segments
    )
    mask_token_id = require_int("mask_token_id", mask_token_id, 0, vocab_size(model) - 1)
    if max_batch_tokens is not None:
        max_batch_tokens = require_int("max_batch_tokens", max_batch_tokens, 1)
    max_batch_bytes = require_int("max_batch_bytes", max_batch_bytes, 1)
    require_bool("return_stats", return_stats)
    limits = _Limits(
        max_batch_bytes,
        max_batch_tokens if max_batch_tokens is not None else 1 << 62,
        PADDING_SLACK.get(input_ids.device.type, DEFAULT_PADDING_SLACK),
    )
    with torch.no_grad(), eval_mode(model):
        scores, stats = _score(
            model, input_ids, attention_mask, host, mode, mask_token_id, limits, stride
        )
    require_finite_scores(scores, "the model's outputs overflowed or its weights are not finite")
    return (scores, stats) if return_stats else scores


__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "ModelDims",
    "PerturbationStats",
    "counterfactual_bytes",
    "model_dims",
    "perturbation_importance",
]
