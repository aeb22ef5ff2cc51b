"""Fused GRPO loss through the lm head with per-token advantages (SPEC section 7).

The loss is a scalar, so its gradients are computed inside the op's forward. Either in one
walk over row chunks of the logits (each chunk folded into its rows' logprobs, turned into its
gradient in place through the closed-form d loss / d logprob of the per-token surrogate, and
reduced by two GEMMs: three GEMMs a chunk), or, where row chunks are short or the weights are
half precision (_one_walk_wins), by token_logprobs' walks: the forward walk for logprobs and
logsumexps, then the gradient walk recomputing the logits (four). No [N, V] logits; the
autograd backward only scales the stored gradients by the incoming gradient of the loss."""

from __future__ import annotations

from typing import NamedTuple

import torch

from oar_kernels import logprobs
from oar_kernels._checks import (
    require_float_tensor,
    require_int,
    require_mask,
    require_real_in,
    require_same_device,
)
from oar_kernels._ops import lib
from oar_kernels.logprobs import (
    FoldState,
    LmHeadGrads,
    accumulation_dtype,
    check_lm_head,
    check_op_args,
    check_targets,
    lm_head_backward,
    lm_head_forward,
    logit_chunks,
    row_chunks,
)

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
# The loss walks the same chunks with the same steps as token_logprobs (oar-kernels info
# names the CUDA one, which follows OAR_KERNELS_LOGPROB_BACKEND).
CPU_BACKEND = "fused loss: " + logprobs.CPU_BACKEND
CUDA_BACKEND = "fused loss: " + logprobs.CUDA_BACKEND


class GRPOLoss(NamedTuple):
    loss: torch.Tensor  # [] differentiable w.r.t. hidden, weight and bias
    clip_fraction: torch.Tensor  # [] share of masked tokens whose ratio was clipped
    mean_kl: torch.Tensor  # [] masked mean of the k3 estimator (0 without ref_logprobs)
    mean_ratio: torch.Tensor  # [] masked mean of pi / pi_old
    logprobs: torch.Tensor  # [B, T] per-token logprobs (no grad), e.g. for logging


def grpo_loss_reference(
    hidden,
    weight,
    targets,
    advantages,
    mask,
    *,
    old_logprobs=None,
    ref_logprobs=None,
    bias=None,
    loss_type="grpo",
    epsilon_low=0.2,
    epsilon_high=None,
    beta=0.0,
    temperature=1.0,
    max_completion_length=None,
    num_items_in_batch=None,
):
    """Float64 transcription of `grpo_loss` on full logits, TRL's formula term by term.
    Returns (loss [], [clip_fraction, mean_kl, mean_ratio] detached, logprobs [B, T] detached),
    differentiable w.r.t. hidden, weight and bias when they require grad."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logps = torch.log_softmax(logits / temperature, -1).gather(-1, targets[..., None])[..., 0]
    old = logps.detach() if old_logprobs is None else old_logprobs.double()
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).double()
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        ref = ref_logprobs.double()
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        per_token = per_token + beta * kl
    m = mask.double()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo" or (loss_type == "dapo" and num_items_in_batch is None):
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / num_items_in_batch
    else:  # dr_grpo
        length = m.shape[1] if max_completion_length is None else max_completion_length
        loss = (per_token * m).sum() / (m.shape[0] * length)
    clipped = ((coef_1 < 1 - epsilon_low) & (adv < 0)) | ((coef_1 > 1 + eps_high) & (adv > 0))
    count = m.sum().clamp(min=1)
    metrics = [(clipped * m).sum() / count, (kl * m).sum() / count, (coef_1 * m).sum() / count]
    return loss, [x.detach() for x in metrics], logps.detach()


def per_token_terms(logprobs, old_logprobs, ref_logprobs, advantages, eps_low, eps_high, beta):
    """Per-token loss, its derivative w.r.t. logprobs, clipped flags, ratios and k3 ([N] each).

    loss_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3, rho = exp(lp - old).
    Where the clipped branch wins the loss is constant in lp; elsewhere d/dlp = -rho A.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | (
        (ratio > 1 + eps_high) & (advantages > 0)
    )
    # A = 0 (a group of equal rewards) contributes exactly 0, even where rho overflows.
    moved = torch.where(advantages == 0, 0.0, ratio * advantages)
    clamped = torch.where(advantages == 0, 0.0, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    loss = -torch.minimum(moved, clamped)
    dloss = torch.where(clipped, 0.0, -moved)
    if ref_logprobs is None:
        return loss, dloss, clipped, ratio, torch.zeros_like(loss)
    gap = torch.exp(ref_logprobs - logprobs)
    k3 = gap - (ref_logprobs - logprobs) - 1
    if beta == 0:  # k3 is still reported; beta * k3 would be NaN where k3 overflows
        return loss, dloss, clipped, ratio, k3
    return loss + beta * k3, dloss + beta * (1 - gap), clipped, ratio, k3


def _weighted(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.where(weight != 0, weight * values, 0.0)


def _check_scalars(epsilon_low, epsilon_high, beta, ref_logprobs):
    """The clip range and the KL weight, as floats; beta > 0 needs ref_logprobs."""
    beta = require_real_in("beta", beta, 0.0)
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    return (
        require_real_in("epsilon_low", epsilon_low, 0.0, 1.0),
        require_real_in("epsilon_high", epsilon_high, 0.0),
        beta,
    )


def _check_rows(hidden, **rows) -> None:
    """The op's per-token inputs: float [N] on hidden's device (None where optional)."""
    for name, value in rows.items():
        if value is None:
            continue
        require_float_tensor(name, value)
        if value.shape != hidden.shape[:1]:
            raise ValueError(f"{name} must be [N]={hidden.shape[0]}, got {tuple(value.shape)}")
        require_same_device(hidden=hidden, **{name: value})


# Which walk grpo_loss takes when it computes gradients: "one" (_one_walk), "two"
# (token_logprobs' forward walk, then its backward walk recomputing the logits), or "auto"
# (_one_walk_wins). Tests set "one" and "two" to check both.
WALK = "auto"
# Row chunks shorter than this make the one walk's GEMMs (and its d weight sum over row
# chunks) slower than the GEMM it saves. CPU, one thread, float32, grpo_loss fwd+bwd, two
# walks' time / one walk's (8 MiB chunks), H=256: 512 rows a chunk (V=4096) 1.29-1.36x, 256
# (V=8192) 1.23x, 128 (V=16384) 1.04x, 65 (V=32000) 1.06-1.12x and 1.01x at H=1024, 32
# (V=151936) 0.76-0.80x. Interleaved repeats on a shared 2-core machine: +-8% noise.
ONE_WALK_MIN_ROWS = 64


def _one_walk_wins(hidden, weight) -> bool:
    """Where the one walk is the default: row chunks of at least ONE_WALK_MIN_ROWS rows (or
    all rows), and float32 (float64) weights. Its d weight sums over row chunks in float32: no
    extra memory for float32 weights, but a [V, H] float32 buffer beside a bf16 one (the two
    walks write d weight once per vocabulary chunk in the weight's dtype) and a bf16 [V, H]
    product per chunk on CPU, so half-precision weights take two walks."""
    if WALK != "auto":
        return WALK == "one"
    if logprobs.uses_fused(hidden):  # the fused kernels walk their own way
        return False
    rows, vocab = hidden.shape[0], weight.shape[0]
    first = row_chunks(rows, vocab, hidden.device)[0]
    tall = first.stop - first.start >= min(rows, ONE_WALK_MIN_ROWS)
    return tall and accumulation_dtype(weight.dtype) == weight.dtype


def _one_walk(hidden, weight, targets, bias, temperature, grad_of, active):
    """(logprobs, lse, (d hidden, d weight, d bias)) in one walk over row chunks of all columns,
    three GEMMs a chunk where the two walks take four: the per-token loss is row-local, so a
    chunk's logits, once folded into its rows' logprobs, turn into their gradient in place
    (grad_of(rows, logprobs) gives d loss / d logprob) and reduce into the lm-head gradients.
    active: [N] bool, the rows whose hidden states enter the d weight GEMM (LmHeadGrads)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    fold, logits_grad = logprobs.chunk_steps(hidden)
    targets = targets.long()
    check_targets(targets, vocab)
    state = FoldState(rows, accumulation_dtype(hidden.dtype), hidden.device, False)
    # The fold's buffer lives beside the chunk and the gradient sums here (the two walks free
    # it before their gradient walk): kept small, it keeps the memory within token_logprobs'.
    state.work_bytes = logprobs.WORK_BYTES
    logps, lse = torch.empty_like(state.max), torch.empty_like(state.max)
    grads = LmHeadGrads(hidden, weight, bias is not None, active=active)
    for chunk, _, logits in logit_chunks(hidden, weight, bias, by_vocab=False):
        part = state.rows(chunk)
        fold(logits, targets[chunk], temperature, part)
        part.finish(logps[chunk], lse[chunk])
        grad = grad_of(chunk, logps[chunk])
        logits_grad(logits, targets[chunk], lse[chunk], None, grad, None, temperature)
        grads.add(chunk, logits)
    return logps, lse, grads.result()


def _grpo_loss_impl(
    hidden,
    weight,
    targets,
    advantages,
    token_weight,
    metric_weight,
    old_logprobs,
    ref_logprobs,
    bias,
    epsilon_low,
    epsilon_high,
    beta,
    temperature,
    compute_grads=True,
):
    check_op_args(hidden, weight, targets, bias, temperature)
    _check_rows(
        hidden,
        advantages=advantages,
        token_weight=token_weight,
        metric_weight=metric_weight,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
    )
    _check_scalars(epsilon_low, epsilon_high, beta, ref_logprobs)
    acc = accumulation_dtype(hidden.dtype)
    adv, w, m = advantages.to(acc), token_weight.to(acc), metric_weight.to(acc)
    old = None if old_logprobs is None else old_logprobs.to(acc)
    ref = None if ref_logprobs is None else ref_logprobs.to(acc)

    def terms_of(rows, logps):
        return per_token_terms(
            logps,
            logps if old is None else old[rows],
            None if ref is None else ref[rows],
            adv[rows],
            epsilon_low,
            epsilon_high,
            beta,
        )

    def grad_of(rows, logps):
        # The loss is linear in the per-token terms: its logprob gradient is w * d term / d lp.
        return _weighted(w[rows], terms_of(rows, logps)[1])

    # Padding rows must not reach the weight gradient even when their hidden states hold
    # NaN (0 * NaN in the GEMM): they enter the gradient GEMMs as zeros.
    active = (w != 0) | (m != 0)
    everything = slice(None)
    if compute_grads and _one_walk_wins(hidden, weight):
        logps, _, grads = _one_walk(hidden, weight, targets, bias, temperature, grad_of, active)
    else:
        logps, no_entropy, lse = lm_head_forward(
            hidden, weight, targets.long(), bias, temperature, False
        )
        grads = (hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0))
        if compute_grads:
            grads = lm_head_backward(
                grad_of(everything, logps),
                no_entropy,
                torch.where(active[:, None], hidden, 0.0),
                weight,
                targets.long(),
                bias,
                lse,
                no_entropy,
                temperature,
            )
    terms, _, clipped, ratio, k3 = terms_of(everything, logps)
    # Tokens of weight 0 (padding) are selected out, not multiplied by 0: whatever their
    # advantages or old/ref logprobs hold (NaN, or a ratio that overflows), they count for 0.
    loss = _weighted(w, terms).sum()
    metrics = torch.stack([_weighted(m, x).sum() for x in (clipped, k3, ratio)])
    return (loss, metrics, logps, *grads)


for _key in ("CPU", "CUDA"):
    lib.impl("grpo_loss", _grpo_loss_impl, _key)


def _setup_context(ctx, inputs, output):
    _, metrics, logprobs, grad_hidden, grad_weight, grad_bias = output
    # Only the loss is differentiable: the metrics and logprobs are reports (a gradient
    # through them would silently be 0, so autograd refuses it).
    ctx.mark_non_differentiable(metrics, logprobs, grad_hidden, grad_weight, grad_bias)
    # Their incoming gradients would otherwise be materialised as zeros: a [V, H] buffer.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.has_bias = inputs[8] is not None
    ctx.has_grads = inputs[13] if len(inputs) > 13 else True
    ctx.backward_done = False


def _backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():
        # The gradients were computed in the forward as constants: a graph through them would
        # silently give zero second derivatives.
        raise RuntimeError(
            "grpo_loss does not support double backward (backward with create_graph=True)"
        )
    if grad_loss is None:  # only the reports were used (set_materialize_grads(False))
        return (None,) * 14
    if not ctx.has_grads:
        raise RuntimeError("grpo_loss was called with compute_grads=False: it has no gradients")
    traced = type(grad_loss) is not torch.Tensor  # by torch.compile: no mutation there
    if ctx.backward_done and not traced:
        raise RuntimeError(
            "grpo_loss's backward runs once per call (its gradients are scaled in place to "
            "save a copy of them); call grpo_loss again for another backward"
        )
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    scale = grad_loss.to(grad_hidden.dtype)
    if traced:
        return _scaled_gradients(ctx, grad_hidden * scale, grad_weight * scale, grad_bias * scale)
    ctx.backward_done = True
    # In place: a scaled copy would hold the gradients twice ([V, H] for the lm head).
    return _scaled_gradients(
        ctx, grad_hidden.mul_(scale), grad_weight.mul_(scale), grad_bias.mul_(scale)
    )


def _scaled_gradients(ctx, grad_hidden, grad_weight, grad_bias):
    """The autograd backward's tuple: one entry per grpo_loss input."""
    return (
        grad_hidden,
        grad_weight,
        None,
        None,
        None,
        None,
        None,
        None,
        grad_bias if ctx.has_bias else None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("oar::grpo_loss", _backward, setup_context=_setup_context)


def _aggregation_weights(mask, loss_type, max_completion_length, num_items_in_batch):
    """[B, T] weights that turn per-token losses into the loss_type's scalar (TRL's names;
    the normalisers are checked by `_check_normalisers`)."""
    rows, length = mask.shape
    if loss_type == "grpo":  # mean over each sequence's tokens, then over sequences
        return mask / (mask.sum(dim=1, keepdim=True).clamp(min=1) * rows)
    if loss_type == "dapo" and num_items_in_batch is not None:  # sum / tokens of the step
        return mask / num_items_in_batch
    if loss_type in ("bnpo", "dapo"):  # sum over tokens / this batch's token count
        return mask / mask.sum().clamp(min=1)
    # dr_grpo: sum / (B * max_len), max_len the generation budget when given
    return mask / (rows * (length if max_completion_length is None else max_completion_length))


def _check_normalisers(loss_type, max_completion_length, num_items_in_batch, hidden):
    """max_completion_length goes with dr_grpo (an int >= the batch's T), num_items_in_batch
    with dapo (a number > 0, or a 0-dim real tensor on hidden's device, not read: no host
    sync). Returns them, the int as an int."""
    if max_completion_length is not None:
        if loss_type != "dr_grpo":
            raise ValueError(
                f"max_completion_length normalises loss_type 'dr_grpo' only, got {loss_type!r}"
            )
        max_completion_length = require_int(
            "max_completion_length", max_completion_length, hidden.shape[1]
        )
    if num_items_in_batch is None:
        return max_completion_length, None
    if loss_type != "dapo":
        raise ValueError(f"num_items_in_batch normalises loss_type 'dapo' only, got {loss_type!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        tensor = num_items_in_batch
        if tensor.dim() != 0 or tensor.dtype == torch.bool or tensor.is_complex():
            raise TypeError(
                f"num_items_in_batch must be a number or a 0-dim real tensor, got "
                f"{tensor.dtype} of shape {tuple(tensor.shape)}"
            )
        require_same_device(hidden=hidden, num_items_in_batch=tensor)
        return max_completion_length, tensor
    count = require_real_in("num_items_in_batch", num_items_in_batch, 0.0)
    if count == 0:
        raise ValueError("num_items_in_batch must be > 0, got 0")
    return max_completion_length, count


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> GRPOLoss:
    """Clipped GRPO surrogate (+ beta * k3 KL) straight from hidden states (SPEC section 7).

    hidden: [B, T, H] hidden states that predict targets; weight: [V, H] lm head (same dtype);
    targets: [B, T] int; advantages: [B] or [B, T] (per-token, e.g. from reshape_advantages);
    mask: [B, T] bool/int, the completion tokens that count.
    old_logprobs: [B, T] from the rollout policy (None: on-policy, ratio 1);
    ref_logprobs: [B, T] from the reference model, needed when beta > 0.
    loss_type: how the per-token losses l [B, T] become the scalar (m = mask, TRL 1.16's
    names and normalisers):
      grpo     mean over the B rows of sum_t m l / max(sum_t m, 1) (a row without tokens is 0);
      bnpo     sum m l / max(sum m, 1), this batch's token count;
      dapo     sum m l / num_items_in_batch (None: as bnpo);
      dr_grpo  sum m l / (B * max_completion_length) (None: the batch's T).
    max_completion_length: dr_grpo's length, the generation budget (an int >= T).
    num_items_in_batch: dapo's divisor, a number > 0 or a 0-dim tensor (not read). Under
    gradient accumulation and data-parallel gradient averaging, pass the token count of the
    optimizer step over all micro-batches and processes divided by the number of processes
    (what TRL's GRPOTrainer divides by): the averaged gradient is then that of the sum over
    every token of the step / its token count.
    Nothing is divided by the accumulation steps: TRL divides grpo, bnpo and dr_grpo losses
    by them outside this function (`OARGRPOTrainer` does the same). The metrics are masked
    means over this batch's tokens.
    Returns GRPOLoss; loss.backward() reaches hidden, weight and bias.
    """
    temperature = check_lm_head(hidden, weight, targets, bias, temperature, hidden_dims=(3,))
    shape = hidden.shape[:2]
    require_float_tensor("advantages", advantages)
    if advantages.shape not in (shape[:1], shape):
        raise ValueError(
            f"advantages must be [B] or [B, T] for {tuple(shape)}, got {tuple(advantages.shape)}"
        )
    mask = require_mask("mask", mask, shape)
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if value is not None:
            require_float_tensor(name, value)
            if value.shape != shape:
                raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    epsilon_low, epsilon_high, beta = _check_scalars(epsilon_low, epsilon_high, beta, ref_logprobs)
    max_completion_length, num_items_in_batch = _check_normalisers(
        loss_type, max_completion_length, num_items_in_batch, hidden
    )
    optional = {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}
    require_same_device(
        hidden=hidden,
        advantages=advantages,
        mask=mask,
        **{k: v for k, v in optional.items() if v is not None},
    )

    weights = mask.to(accumulation_dtype(hidden.dtype))
    per_token_adv = advantages[:, None].expand(shape) if advantages.dim() == 1 else advantages
    flat = lambda t: None if t is None else t.detach().reshape(-1)  # noqa: E731
    # Without a graph to feed (no_grad, or frozen tensors) the gradient walk is skipped.
    differentiable = [t for t in (hidden, weight, bias) if t is not None]
    compute_grads = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    loss, metrics, logprobs, *_ = torch.ops.oar.grpo_loss(
        hidden.reshape(shape.numel(), hidden.shape[-1]),
        weight,
        targets.reshape(-1).long(),
        flat(per_token_adv),
        flat(_aggregation_weights(weights, loss_type, max_completion_length, num_items_in_batch)),
        flat(weights / weights.sum().clamp(min=1)),
        flat(old_logprobs),
        flat(ref_logprobs),
        bias,
        epsilon_low,
        epsilon_high,
        beta,
        temperature,
        compute_grads,
    )
    return GRPOLoss(loss, metrics[0], metrics[1], metrics[2], logprobs.reshape(shape))
