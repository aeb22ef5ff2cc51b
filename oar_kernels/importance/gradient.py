"""OAR-G: input-gradient importance for a whole batch in one pass (SPEC sections 2, 3, 5).

One forward of the decoder on the (noised) input embeddings, the outcome objective from the
outcome positions' hidden states only (no [B, T, V] logits), one input-only backward
(`torch.autograd.grad`; parameters are frozen for the pass and parameter `.grad` is never
touched), then the saliency |sum_h g * e| on the scored tokens. Rows are independent, so the
summed objective gives every row's gradient at once. Every value check and every fact that
picks the pass (answer token counts, noise) is read back to the host once, up front.

The logits are the model's own: a scaled (Cohere `logit_scale`, Granite `logits_scaling`)
or soft-capped (Gemma-2 `final_logit_softcapping`) head is read from the config
(`causal_lm.logit_transform`) and applied wherever logits or logprobs are made.

Also here: the `oar::saliency` op (reference, torch, Triton) for that last reduction. The
batch checks and model helpers OAR-P shares live in `importance.batch` and
`importance.causal_lm`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from oar_kernels._checks import (
    require_float_tensor,
    require_int,
    require_mask,
    require_real_in,
    require_same_device,
)
from oar_kernels._ops import lib
from oar_kernels._triton import on_device_of, tl, triton
from oar_kernels.importance.batch import check_batch, outcome_positions, require_finite_scores
from oar_kernels.importance.causal_lm import (
    decode,
    eval_mode,
    head_logits,
    head_logprobs,
    logit_transform,
    sequence_logprobs,
)

# ------------------------------------------------------------------ saliency reduction


def saliency_reference(grad, embeds, score_mask):
    """Float64 |sum_h g * e| on score_mask, 0 elsewhere: [B, T] float64."""
    dot = (grad.double() * embeds.double()).sum(-1).abs()
    return torch.where(score_mask, dot, 0.0)


def _check_saliency_args(grad, embeds, score_mask) -> None:
    """The op's own checks (raw torch.ops.oar.saliency callers bypass check_batch)."""
    require_float_tensor("grad", grad)
    require_float_tensor("embeds", embeds)
    if grad.dim() != 3 or embeds.shape != grad.shape:
        raise ValueError(
            f"grad and embeds must be [B, T, H] of one shape, got {tuple(grad.shape)} and "
            f"{tuple(embeds.shape)}"
        )
    require_mask("score_mask", score_mask, grad.shape[:2])
    require_same_device(grad=grad, embeds=embeds, score_mask=score_mask)


def _saliency_torch(grad, embeds, score_mask):
    _check_saliency_args(grad, embeds, score_mask)
    # float64 inputs (tests' float64 models) keep float64 sums; the result is float32.
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    dot = torch.linalg.vecdot(grad.to(acc), embeds.to(acc)).abs()
    # Contiguous whatever the inputs' strides, as the fake kernel in _ops.py says.
    return torch.where(score_mask != 0, dot, 0.0).float().contiguous()


if triton is not None:

    @triton.jit
    def _saliency_kernel(grad_ptr, embeds_ptr, mask_ptr, out_ptr, H, BLOCK_H: tl.constexpr):
        """One program per token: a float32 dot product over the hidden size."""
        token = tl.program_id(0).to(tl.int64)
        # An unscored token reads nothing: its row is empty.
        width = tl.where(tl.load(mask_ptr + token) != 0, H, 0)
        cols = tl.arange(0, BLOCK_H)
        total = tl.zeros((BLOCK_H,), tl.float32)
        for start in range(0, H, BLOCK_H):
            inside = start + cols < width
            g = tl.load(grad_ptr + token * H + start + cols, mask=inside, other=0.0)
            e = tl.load(embeds_ptr + token * H + start + cols, mask=inside, other=0.0)
            total += g.to(tl.float32) * e.to(tl.float32)
        tl.store(out_ptr + token, tl.abs(tl.sum(total, axis=0)))


def _saliency_triton(grad, embeds, score_mask):
    grad, embeds = grad.contiguous(), embeds.contiguous()
    out = torch.empty(score_mask.shape, dtype=torch.float32, device=grad.device)
    tokens, width = out.numel(), grad.shape[-1]
    if tokens:
        with on_device_of(grad):
            _saliency_kernel[(tokens,)](
                grad,
                embeds,
                (score_mask != 0).contiguous().view(torch.uint8),  # any integer mask, as bytes
                out,
                width,
                BLOCK_H=min(1024, triton.next_power_of_2(width)),
            )
    return out


lib.impl("saliency", _saliency_torch, "CPU")


def _saliency_cuda(grad, embeds, score_mask):
    _check_saliency_args(grad, embeds, score_mask)
    use_triton = triton is not None and grad.dtype != torch.float64
    return (_saliency_triton if use_triton else _saliency_torch)(grad, embeds, score_mask)


lib.impl("saliency", _saliency_cuda, "CUDA")


def _saliency_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _saliency_backward(ctx, grad_out):
    """d|sum_h g e| = sign(sum_h g e) (e dg + g de) on scored tokens (0 where the sum is 0)."""
    grad, embeds, score_mask = ctx.saved_tensors
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    dot = torch.linalg.vecdot(grad.to(acc), embeds.to(acc))
    coef = torch.where(score_mask != 0, torch.sign(dot) * grad_out.to(acc), 0.0)[..., None]
    return (coef * embeds).to(grad.dtype), (coef * grad).to(embeds.dtype), None


torch.library.register_autograd("oar::saliency", _saliency_backward, setup_context=_saliency_setup)
CPU_BACKEND = "torch"
CUDA_BACKEND = "triton" if triton is not None else "torch (triton not installed)"

# ------------------------------------------------------------------ the OAR-G pass

# The noise probes the embeddings' neighbourhood (SPEC section 5's sigma, NOISE_STD by
# default); beyond the embeddings' own scale it measures another input, and large values
# overflow the model's norms into all-zero scores.
NOISE_STD = 1e-3
MAX_NOISE_STD = 1.0


@contextlib.contextmanager
def _frozen_parameters(model):
    """Parameters require no grad during the pass (so the backward reaches only the input
    embeddings) and get their flags back after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _checkpoint_in_eval(layer, forward, *args):
    """A layer's forward under non-reentrant activation checkpointing (it works with
    torch.autograd.grad), run and recomputed in eval mode."""

    def run(*inputs):
        layer.training = False
        try:
            return forward(*inputs)
        finally:
            layer.training = True

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


@contextlib.contextmanager
def _activation_checkpointing_kept(model):
    """Layers the user checkpoints (model.gradient_checkpointing_enable()) stay checkpointed
    in the input-gradient pass: transformers checkpoints a layer only in training mode, so the
    layer is flagged training for its wrapper and runs in eval mode inside (no dropout). The
    pass then holds layer inputs instead of every activation, at one more decoder forward."""
    layers = [
        m
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False) is True
        and callable(getattr(m, "_gradient_checkpointing_func", None))
    ]
    saved = [(m, m.training, m._gradient_checkpointing_func) for m in layers]
    for layer in layers:
        layer.training = True
        layer._gradient_checkpointing_func = functools.partial(_checkpoint_in_eval, layer)
    try:
        yield
    finally:
        for layer, training, func in saved:
            layer.training, layer._gradient_checkpointing_func = training, func


def _answer_logprob_mean(model, hidden, input_ids, answer_mask, answers):
    """phi per row: mean over answer tokens t of log p(x_t | h_{t-1}) ([B]).
    answers: [K, 2] (row, t - 1) of the K answer tokens."""
    rows, before = answers.unbind(1)
    logp = head_logprobs(model, hidden[rows, before], input_ids[rows, before + 1])
    total = logp.new_zeros(answer_mask.shape[0]).index_add(0, rows, logp)
    return total / answer_mask[:, 1:].sum(dim=1).clamp(min=1)


def _outcome_log_distribution(model, hidden, answer_mask, answers, mode, last_pos, uses_last):
    """log P per row ([B, V]): softmax of the mean answer logits (answer_mean) or of the
    logits at last_pos (last, and rows without an answer span)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    logits = head_logits(model, hidden[rows, last_pos])
    if mode == "answer_mean":
        answer_rows, before = answers.unbind(1)
        counts = answer_mask[:, 1:].sum(dim=1, keepdim=True).clamp(min=1)
        if logit_transform(model).softcap is None:
            # A scaled head is affine: the mean of the logits is the head of the mean state.
            total = torch.zeros_like(hidden[:, 0]).index_add(
                0, answer_rows, hidden[answer_rows, before]
            )
            mean_logits = head_logits(model, total / counts.to(total.dtype))
        else:  # a soft cap is not: the K answer positions' logits, then their mean
            total = torch.zeros_like(logits).index_add(
                0, answer_rows, head_logits(model, hidden[answer_rows, before])
            )
            mean_logits = total / counts
        logits = torch.where(uses_last[:, None], logits, mean_logits)
    return torch.log_softmax(logits, -1)


def _objective(model, input_ids, answer_mask, answers, mode, clean_log_p, noisy_hidden, outcome):
    """Sum over rows of J (SPEC section 5), differentiable through noisy_hidden."""
    total = 0.0
    if clean_log_p is not None:  # KL(P(x) || P_{e+eps}(x)) for KL rows
        last_pos, uses_last = outcome
        noisy_log_p = _outcome_log_distribution(
            model, noisy_hidden, answer_mask, answers, mode, last_pos, uses_last
        )
        kl = (clean_log_p.exp() * (clean_log_p - noisy_log_p)).sum(-1)
        kl_rows = uses_last if mode == "answer_joint" else torch.ones_like(uses_last)
        total = total + torch.where(kl_rows, kl, 0.0).sum()
    if mode == "answer_joint":  # phi(x) - phi_{e+eps}(x); phi(x) is constant in e
        # Rows without an answer span have no terms: their phi is 0.
        total = (
            total - _answer_logprob_mean(model, noisy_hidden, input_ids, answer_mask, answers).sum()
        )
    return total


@dataclass(frozen=True)
class _Plan:
    """What the one host read decided for a micro-batch."""

    answer_tokens: int  # K, the answer tokens of its rows
    noisy: bool  # the noise has a nonzero element
    has_last_rows: bool  # a row without an answer span (it uses `last`)


def _gradient_importance_batch(
    model, input_ids, attention_mask, score_mask, answer_mask, mode, noise, plan, want_old_logprobs
):
    """Scores [B, T] and, if asked, the clean per-token logprobs [B, T] of the same pass."""
    embeds = model.get_input_embeddings()(input_ids).detach()
    # (row, t - 1) of the K answer tokens; K is known on the host, so no read back.
    answers = answer_mask[:, 1:].nonzero_static(size=plan.answer_tokens) if mode != "last" else None
    # A KL's gradient is exactly 0 without noise, so a noiseless joint pass leaves the rows
    # that fall back to `last` out: they score exactly 0, not rounding error that the reshape
    # would stretch into weights. (The KL modes refuse a noiseless pass.)
    needs_kl = mode != "answer_joint" or (plan.noisy and plan.has_last_rows)
    outcome = outcome_positions(attention_mask, answer_mask, mode) if needs_kl else None
    clean_hidden = clean_log_p = None
    # The clean forward exists for the KL's P(x); without noise the grad forward is clean too.
    if needs_kl or (want_old_logprobs and plan.noisy):
        with torch.no_grad():
            clean_hidden = decode(model, embeds, attention_mask)
    if needs_kl:
        clean_log_p = _outcome_log_distribution(
            model, clean_hidden, answer_mask, answers, mode, *outcome
        )
    if needs_kl or plan.answer_tokens:
        # dJ/de at e + noise is the gradient w.r.t. the noised input itself: that is the leaf.
        noised = embeds + noise * score_mask[..., None].to(noise.dtype) if plan.noisy else embeds
        leaf = noised.detach().requires_grad_()
        with _activation_checkpointing_kept(model):
            hidden = decode(model, leaf, attention_mask)
            objective = _objective(
                model, input_ids, answer_mask, answers, mode, clean_log_p, hidden, outcome
            )
            (grad,) = torch.autograd.grad(objective, leaf)
        scores = torch.ops.oar.saliency(grad, embeds, score_mask)
    else:  # no objective (no answer token, no KL row): scores 0, a forward for the logprobs
        scores, _ = _zero_outputs(input_ids, False)
        if want_old_logprobs and clean_hidden is None:
            with torch.no_grad():
                hidden = decode(model, embeds, attention_mask)
    old_logprobs = None
    if want_old_logprobs:
        source = hidden if clean_hidden is None else clean_hidden
        old_logprobs = sequence_logprobs(model, source, input_ids, attention_mask)
    return scores, old_logprobs


def _row_groups(rows: int, width: int, max_batch_tokens: int | None):
    """Consecutive row ranges whose padded token count stays within the budget."""
    per_group = rows if max_batch_tokens is None else max(1, max_batch_tokens // max(width, 1))
    return [slice(start, min(rows, start + per_group)) for start in range(0, rows, per_group)]


GRADIENT_OVERFLOW = (
    "the noised forward overflowed (noise_std too large?) or the model's weights are not finite"
)


def _check_gradient_arguments(mode, noise_std, generator, max_batch_tokens) -> float:
    noise_std = require_real_in("noise_std", noise_std, 0.0, MAX_NOISE_STD)
    if noise_std == 0 and mode != "answer_joint":
        raise ValueError(f"noise_std must be > 0 in mode {mode!r}: the KL's gradient is 0 at 0")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if max_batch_tokens is not None:
        require_int("max_batch_tokens", max_batch_tokens, 1)
    return noise_std


def _draw_noise(shape, width, noise_std, generator, device):
    """N(0, noise_std^2) [*shape, width] on `device`, drawn on the generator's device."""
    gen_device = generator.device if generator is not None else device
    noise = torch.randn((*shape, width), generator=generator, device=gen_device)
    return noise.to(device) * noise_std


def _zero_outputs(input_ids, want_old_logprobs):
    scores = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    return scores, torch.zeros_like(scores) if want_old_logprobs else None


def run_gradient_importance(
    model,
    input_ids,
    attention_mask,
    score_mask,
    answer_mask,
    *,
    mode,
    noise_std,
    generator,
    max_batch_tokens,
    noise,
    want_old_logprobs,
    check_finite=True,
):
    """Validated batch -> (scores [B, T] float32, old logprobs [B, T] float32 or None).

    Host reads: one for every value check and the facts that choose the pass (answer token
    counts, whether there is noise), one for finite scores (none with check_finite=False,
    for callers that read the scores' finiteness together with their own values).
    """
    (attention_mask, score_mask, answer_mask), checks = check_batch(
        model, input_ids, attention_mask, score_mask, answer_mask, mode
    )
    noise_std = _check_gradient_arguments(mode, noise_std, generator, max_batch_tokens)
    shape = input_ids.shape
    if input_ids.numel() == 0:  # nothing to score, and a decoder cannot run on no tokens
        checks.read()
        return _zero_outputs(input_ids, want_old_logprobs)
    weight = model.get_input_embeddings().weight
    if noise is None and noise_std > 0:
        noise = _draw_noise(shape, weight.shape[1], noise_std, generator, input_ids.device)
    noisy = torch.zeros((), dtype=torch.bool, device=input_ids.device)
    if noise is not None:
        noise = noise.to(weight.dtype)
        noisy = noise.any()
    if mode != "answer_joint":
        checks.add(
            f"noise_std={noise_std} underflows to no noise in {weight.dtype}: the KL's "
            "gradient is 0 without noise",
            ~noisy,
        )
    *answer_tokens, noisy = checks.read(torch.cat([answer_mask[:, 1:].sum(dim=1), noisy[None]]))
    attention_mask = attention_mask.long()
    groups = _row_groups(shape[0], shape[1], max_batch_tokens)
    if len(groups) > 1:
        scores, old = _zero_outputs(input_ids, want_old_logprobs)
    with _frozen_parameters(model), eval_mode(model), torch.enable_grad():
        for rows in groups:
            counts = answer_tokens[rows]
            plan = _Plan(sum(counts), bool(noisy), 0 in counts)
            group_scores, group_old = _gradient_importance_batch(
                model,
                input_ids[rows],
                attention_mask[rows],
                score_mask[rows],
                answer_mask[rows],
                mode,
                None if noise is None else noise[rows],
                plan,
                want_old_logprobs,
            )
            if len(groups) == 1:  # the whole batch: no copies
                scores, old = group_scores, group_old
                break
            scores[rows] = group_scores
            if old is not None:
                old[rows] = group_old
    if check_finite:
        require_finite_scores(scores, GRADIENT_OVERFLOW)
    return scores, old


def gradient_importance(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    answer_mask: torch.Tensor | None = None,
    *,
    mode: str = "answer_joint",
    noise_std: float = NOISE_STD,
    generator: torch.Generator | None = None,
    max_batch_tokens: int | None = None,
    _noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """OAR-G token importance for a padded batch (SPEC section 5).

    model: a Hugging Face causal LM (get_input_embeddings, get_decoder, get_output_embeddings).
    input_ids, attention_mask, score_mask, answer_mask: [B, T]; left or right padding; the
    batch rules of `check_batch` hold (ValueError otherwise). B = 0 or T = 0: empty scores.
    mode: "answer_joint" (phi = mean answer logprob), "answer_mean" or "last" (KL of the
    outcome distribution); rows without an answer span use "last".
    noise_std: sigma of the Gaussian noise on scored embeddings, in [0, 1] (0 allowed in
    answer_joint, where rows falling back to "last" then score 0: a KL's gradient is 0
    without noise).
    generator: seeds the noise. max_batch_tokens: micro-batch rows so that rows x T stays under it.
    Returns [B, T] float32 scores, 0 outside score_mask. Parameter .grad is never touched; the
    pass runs in eval mode (dropout off) and restores every module's mode. Logits are the
    model's own (scaled or soft-capped heads included, see `logit_transform`). A model with
    gradient checkpointing enabled is checkpointed in the pass too (less memory, one more
    decoder forward). Host reads: one up front (every check), one for finite scores.
    """
    scores, _ = run_gradient_importance(
        model,
        input_ids,
        attention_mask,
        score_mask,
        answer_mask,
        mode=mode,
        noise_std=noise_std,
        generator=generator,
        max_batch_tokens=max_batch_tokens,
        noise=_noise,
        want_old_logprobs=False,
    )
    return scores
