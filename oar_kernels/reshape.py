"""Bi-Level reshape (SPEC section 6): importance scores -> token weights -> per-token advantages.

One file holds the whole op family: the float64 reference, the vectorized torch path, the
Triton kernel and their registration for `oar::bilevel_weights` / `oar::reshape_advantages`
(schemas in `_ops.py`; the C++ CPU kernel in `csrc/reshape.cpp`).
"""

from __future__ import annotations

import torch

from oar_kernels import _extension
from oar_kernels._checks import (
    require_bool,
    require_finite,
    require_float_tensor,
    require_mask,
    require_real_in,
    require_same_device,
)
from oar_kernels._ops import lib
from oar_kernels._triton import on_device_of, tl, triton

EPS = 1e-8
TAU = 0.25
BETA = 1.0
FLOOR = 0.1
# Longest row chunk a Triton program holds at once; longer rows loop over chunks.
MAX_BLOCK = 4096
# A boosted weight is at most 1 + beta, and a row's mass sums up to 2^31 of them in float32:
# a larger beta could overflow that sum (and already makes every damped weight vanish).
MAX_BETA = 1e6


def check_params(tau, beta, floor, preserve_mass):
    """Validates the scalar arguments (the same checks as csrc/reshape.cpp's op)."""
    return (
        require_real_in("tau", tau, 0.0, 1.0),
        require_real_in("beta", beta, 0.0, MAX_BETA),
        require_real_in("floor", floor, 0.0, 1.0),
        require_bool("preserve_mass", preserve_mass),
    )


def _check_args(scores, score_mask, tau, beta, floor, preserve_mass):
    """Validates the reshape arguments; returns (scores, bool mask, tau, beta, floor, preserve)."""
    require_float_tensor("scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, T], got shape {tuple(scores.shape)}")
    mask = require_mask("score_mask", score_mask, scores.shape)
    require_same_device(scores=scores, score_mask=score_mask)
    return (scores.detach(), mask.detach(), *check_params(tau, beta, floor, preserve_mass))


def unit_scores(scores, mask) -> torch.Tensor:
    """SPEC section 6 steps 1-2: u = (c - min c) / spread in [0, 1], c = log1p(max(score, 0)).

    float64 scores stay float64 (float32 holds neither 1e300 nor a row's 1e-18 vs 1e-75,
    which the SPEC's u < theta tells apart); every other dtype computes in float32.
    """
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    x = scores.to(acc).clamp_min(0)
    # log1p(x) = x to the last bit below eps; torch's log1p loses subnormals (1e-45 -> 0).
    c = torch.where(x < torch.finfo(acc).eps, x, torch.log1p(x))
    c_min = torch.where(mask, c, torch.inf).amin(dim=1, keepdim=True)
    c_max = torch.where(mask, c, -torch.inf).amax(dim=1, keepdim=True)
    spread = c_max - c_min
    return torch.where(mask, (c - c_min) / torch.where(spread > 0, spread, 1.0), 0.0)


def _check_op_args(scores, score_mask, tau, beta, floor, preserve_mass, out, check_finite):
    """Every kernel's own checks: callers of torch.ops.oar.* bypass the public wrappers."""
    scores, mask, *params = _check_args(scores, score_mask, tau, beta, floor, preserve_mass)
    if out.shape != scores.shape or out.dtype != torch.float32 or out.device != scores.device:
        raise ValueError(
            f"out must be a float32 tensor of shape {tuple(scores.shape)} on {scores.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if torch._debug_has_internal_overlap(out) == 1:  # an expanded tensor
        raise ValueError("out must not have overlapping elements (an expanded tensor)")
    if require_bool("check_finite", check_finite):
        require_finite("scores", scores, where=mask)
    return scores, mask, *params


# ---------------------------------------------------------------------------- reference


def bilevel_weights_reference(
    scores, score_mask, *, tau=TAU, beta=BETA, floor=FLOOR, preserve_mass=True
) -> torch.Tensor:
    """Float64 transcription of SPEC section 6, one row at a time (for tests).

    scores: [B, T] float; score_mask: [B, T] bool or int. Returns [B, T] float64.
    """
    scores, mask, tau, beta, floor, preserve_mass = _check_args(
        scores, score_mask, tau, beta, floor, preserve_mass
    )
    require_finite("scores", scores, where=mask)
    scores = scores.to(torch.float64)
    weights = torch.ones_like(scores)
    for b in range(scores.shape[0]):
        (cols,) = mask[b].nonzero(as_tuple=True)
        if cols.numel() == 0:
            continue
        c = torch.log1p(scores[b, cols].clamp_min(0))
        spread = c.max() - c.min()
        u = (c - c.min()) / (spread if spread > 0 else 1.0)
        theta = torch.quantile(u, tau, interpolation="linear")
        w = torch.where(
            u < theta,
            (u / (theta + EPS)).clamp_min(floor),
            1 + beta * (u - theta) / (1 - theta + EPS),
        )
        if preserve_mass:
            w = w * cols.numel() / (w.sum() + EPS)
        weights[b, cols] = w
    return weights


# ----------------------------------------------------------------- vectorized torch path


def _bilevel_weights_torch(
    scores, score_mask, tau, beta, floor, preserve_mass, check_finite=True, *, out
):
    """Whole batch at once: a row sort gives both order statistics of the quantile."""
    scores, mask, tau, beta, floor, preserve_mass = _check_op_args(
        scores, score_mask, tau, beta, floor, preserve_mass, out, check_finite
    )
    if out.numel() == 0:
        return
    n = mask.sum(dim=1, keepdim=True)
    u = unit_scores(scores, mask)
    # Unscored slots sort after every u in [0, 1], so order statistics index the scored ones.
    ordered = torch.where(mask, u, 2.0).sort(dim=1).values
    last = (n - 1).clamp_min(0)
    h = last.to(torch.float64) * tau
    lo = h.floor().long()
    v_lo = ordered.gather(1, lo)
    v_hi = ordered.gather(1, torch.minimum(lo + 1, last))
    theta = v_lo + (h - lo).to(u.dtype) * (v_hi - v_lo)
    w = torch.where(
        u < theta,
        (u / (theta + EPS)).clamp_min(floor),
        1 + beta * (u - theta) / (1 - theta + EPS),
    )
    w = torch.where(mask, w, 0.0)
    if preserve_mass:
        w = w * (n / (w.sum(dim=1, keepdim=True, dtype=torch.float64) + EPS)).to(u.dtype)
    out.copy_(torch.where(mask, w, 1.0))


# ------------------------------------------------------------------------- Triton path

if triton is not None:

    @triton.jit
    def _log1p(x):
        # tl.log1p needs libdevice (absent in the interpreter); Goldberg's identity keeps full
        # relative accuracy for the tiny saliencies OAR-G produces, where log(1 + x) would not.
        y = 1.0 + x
        d = y - 1.0
        tiny = d == 0.0
        return tl.where(tiny, x, tl.log(y) * (x / tl.where(tiny, 1.0, d)))

    @triton.jit
    def _load_log_scores(scores_row, mask_row, cols, T, stride_st, stride_mt):
        m = tl.load(mask_row + cols * stride_mt, mask=cols < T, other=0) != 0
        x = tl.load(scores_row + cols * stride_st, mask=m, other=0.0).to(tl.float32)
        return _log1p(tl.maximum(x, 0.0)), m

    @triton.jit
    def _load_unit_scores(scores_row, mask_row, cols, T, stride_st, stride_mt, c_min, spread):
        c, m = _load_log_scores(scores_row, mask_row, cols, T, stride_st, stride_mt)
        # Clamped so every pass sees u in [0, 1] even where division is approximate.
        return tl.minimum(tl.maximum((c - c_min) / spread, 0.0), 1.0), m

    @triton.jit
    def _bilevel(u, theta, beta, floor, EPS: tl.constexpr):
        damped = tl.maximum(u / (theta + EPS), floor)
        boosted = 1.0 + beta * (u - theta) / (1.0 - theta + EPS)
        return tl.where(u < theta, damped, boosted)

    @triton.jit
    def _bilevel_weights_kernel(
        scores_ptr,
        mask_ptr,
        out_ptr,
        T,
        stride_sb,
        stride_st,
        stride_mb,
        stride_mt,
        stride_ob,
        stride_ot,
        tau,
        beta,
        floor,
        EPS: tl.constexpr,
        PRESERVE_MASS: tl.constexpr,
        BLOCK: tl.constexpr,
        ROW_FITS: tl.constexpr,
    ):
        """One program per row. A row that fits one BLOCK stays in registers; a longer row
        is re-read chunk by chunk in each pass (the passes are cheap next to a sort)."""
        row = tl.program_id(0).to(tl.int64)
        scores_row = scores_ptr + row * stride_sb
        mask_row = mask_ptr + row * stride_mb
        out_row = out_ptr + row * stride_ob
        cols = tl.arange(0, BLOCK)

        n = tl.zeros((), tl.int32)
        c_min = tl.full((), float("inf"), tl.float32)
        c_max = tl.full((), float("-inf"), tl.float32)
        for start in range(0, T, BLOCK):
            c, m = _load_log_scores(scores_row, mask_row, start + cols, T, stride_st, stride_mt)
            n += tl.sum(m.to(tl.int32), axis=0)
            c_min = tl.minimum(c_min, tl.min(tl.where(m, c, float("inf")), axis=0))
            c_max = tl.maximum(c_max, tl.max(tl.where(m, c, float("-inf")), axis=0))
        spread = c_max - c_min
        spread = tl.where(spread > 0.0, spread, 1.0)
        if ROW_FITS:
            u_row, m_row = _load_unit_scores(
                scores_row, mask_row, cols, T, stride_st, stride_mt, c_min, spread
            )

        h = tl.maximum(n - 1, 0).to(tl.float32) * tau
        lo = tl.floor(h)
        rank = lo.to(tl.int32) + 1
        # Exact order statistic for any row length: non-negative floats order like their int32
        # bit patterns, so bisection over [bits(0), bits(1)] needs 30 counting passes.
        bits_lo = tl.zeros((), tl.int32)
        bits_hi = tl.where(n > 0, 0x3F800000, 0).to(tl.int32)
        while bits_lo < bits_hi:
            mid = bits_lo + (bits_hi - bits_lo) // 2
            if ROW_FITS:
                count = tl.sum((m_row & (u_row.to(tl.int32, bitcast=True) <= mid)).to(tl.int32))
            else:
                count = tl.zeros((), tl.int32)
                for start in range(0, T, BLOCK):
                    u, m = _load_unit_scores(
                        scores_row, mask_row, start + cols, T, stride_st, stride_mt, c_min, spread
                    )
                    count += tl.sum((m & (u.to(tl.int32, bitcast=True) <= mid)).to(tl.int32))
            enough = count >= rank
            bits_hi = tl.where(enough, mid, bits_hi)
            bits_lo = tl.where(enough, bits_lo, mid + 1)
        v_lo = bits_lo.to(tl.float32, bitcast=True)

        # The next order statistic is v_lo again if it repeats, else the smallest u above it.
        if ROW_FITS:
            n_at_most = tl.sum((m_row & (u_row <= v_lo)).to(tl.int32))
            above = tl.min(tl.where(m_row & (u_row > v_lo), u_row, float("inf")))
        else:
            n_at_most = tl.zeros((), tl.int32)
            above = tl.full((), float("inf"), tl.float32)
            for start in range(0, T, BLOCK):
                u, m = _load_unit_scores(
                    scores_row, mask_row, start + cols, T, stride_st, stride_mt, c_min, spread
                )
                n_at_most += tl.sum((m & (u <= v_lo)).to(tl.int32))
                above = tl.minimum(above, tl.min(tl.where(m & (u > v_lo), u, float("inf"))))
        v_hi = tl.where((n_at_most > rank) | (above == float("inf")), v_lo, above)
        theta = v_lo + (h - lo) * (v_hi - v_lo)

        scale = 1.0
        if PRESERVE_MASS:
            if ROW_FITS:
                mass = tl.sum(tl.where(m_row, _bilevel(u_row, theta, beta, floor, EPS), 0.0))
            else:
                mass = tl.zeros((), tl.float32)
                for start in range(0, T, BLOCK):
                    u, m = _load_unit_scores(
                        scores_row, mask_row, start + cols, T, stride_st, stride_mt, c_min, spread
                    )
                    mass += tl.sum(tl.where(m, _bilevel(u, theta, beta, floor, EPS), 0.0))
            scale = n.to(tl.float32) / (mass + EPS)
        if ROW_FITS:
            w = tl.where(m_row, _bilevel(u_row, theta, beta, floor, EPS) * scale, 1.0)
            tl.store(out_row + cols * stride_ot, w, mask=cols < T)
        else:
            for start in range(0, T, BLOCK):
                u, m = _load_unit_scores(
                    scores_row, mask_row, start + cols, T, stride_st, stride_mt, c_min, spread
                )
                w = tl.where(m, _bilevel(u, theta, beta, floor, EPS) * scale, 1.0)
                tl.store(out_row + (start + cols) * stride_ot, w, mask=start + cols < T)


def _bilevel_weights_triton(
    scores, score_mask, tau, beta, floor, preserve_mass, check_finite=True, *, out, block_size=None
):
    """One launch for the ragged batch, one program per row.

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
    `block_size` overrides the row chunk (a power of two) so tests can force multi-chunk rows.
    """
    scores, mask, tau, beta, floor, preserve_mass = _check_op_args(
        scores, score_mask, tau, beta, floor, preserve_mass, out, check_finite
    )
    B, T = scores.shape
    if out.numel() == 0:
        return
    if scores.dtype == torch.float64:
        # The kernel computes in float32, which cannot follow float64 scores over their whole
        # range (see unit_scores): they take the torch path, in float64.
        _bilevel_weights_torch(scores, mask, tau, beta, floor, preserve_mass, False, out=out)
        return
    if scores.dtype != torch.float32:
        # Half-precision subnormals did not survive the kernel's own widening (bfloat16 in
        # the interpreter); widening here is exact.
        scores = scores.float()
    block = block_size or min(triton.next_power_of_2(T), MAX_BLOCK)
    mask = mask.view(torch.uint8)
    # The launch goes to the current CUDA device: make it the tensors' device.
    with on_device_of(scores):
        _bilevel_weights_kernel[(B,)](
            scores,
            mask,
            out,
            T,
            scores.stride(0),
            scores.stride(1),
            mask.stride(0),
            mask.stride(1),
            out.stride(0),
            out.stride(1),
            tau,
            beta,
            floor,
            EPS=EPS,
            PRESERVE_MASS=preserve_mass,
            BLOCK=block,
            ROW_FITS=T <= block,
            num_warps=8 if block >= 2048 else 4,
        )


# ------------------------------------------------------------------------ registration


def _register_bilevel_weights(dispatch_key: str, weights_into) -> None:
    def functional(scores, score_mask, tau, beta, floor, preserve_mass, check_finite=True):
        out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        args = (scores, score_mask, tau, beta, floor, preserve_mass, check_finite)
        weights_into(*args, out=out)
        return out

    def into(scores, score_mask, tau, beta, floor, preserve_mass, out, check_finite=True):
        args = (scores, score_mask, tau, beta, floor, preserve_mass, check_finite)
        weights_into(*args, out=out)

    lib.impl("bilevel_weights", functional, dispatch_key)
    lib.impl("bilevel_weights_into", into, dispatch_key)


CPU_BACKEND = "C++ extension (oar_kernels._C)" if _extension.LOADED else "torch (vectorized)"
CUDA_BACKEND = "triton" if triton is not None else "torch (vectorized; triton not installed)"

if not _extension.LOADED:
    _register_bilevel_weights("CPU", _bilevel_weights_torch)
_register_bilevel_weights(
    "CUDA", _bilevel_weights_triton if triton is not None else _bilevel_weights_torch
)


def weigh_advantages(advantages, weights, check_finite: bool = True):
    """A_{b,t} = A_b * w_{b,t} as float32 [B, T]; advantages [B] or [B, T], finite.

    The product is taken in the advantages' precision and must fit the float32 result:
    float64 advantages of 1e39 are an error, not a silent inf (unless check_finite=False,
    which skips this check's read-back to the host).
    """
    per_row = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    acc = torch.float64 if advantages.dtype == torch.float64 else torch.float32
    weighted = (weights.to(acc) * per_row.to(acc)).to(torch.float32)
    if not check_finite or weighted.numel() == 0:
        return weighted
    if not bool(torch.isfinite(weighted).all()):
        require_finite("advantages", advantages)
        raise ValueError(
            "advantages times their weights overflow the float32 result "
            f"(largest |advantage| {advantages.abs().max().item():.3g}, largest weight "
            f"{weights.max().item():.3g}); scale the advantages down"
        )
    return weighted


def _reshape_advantages_impl(
    advantages, scores, score_mask, tau, beta, floor, preserve_mass, check_finite=True
):
    weights = torch.ops.oar.bilevel_weights(
        scores, score_mask, tau, beta, floor, preserve_mass, check_finite
    )
    check_advantages(advantages, scores)  # after the weights op has checked scores
    return weigh_advantages(advantages, weights, check_finite)


lib.impl("reshape_advantages", _reshape_advantages_impl, "CompositeExplicitAutograd")


def _reshape_advantages_setup(ctx, inputs, output):
    advantages, *reshape_args = inputs
    ctx.reshape_args = reshape_args
    ctx.advantages_shape, ctx.advantages_dtype = advantages.shape, advantages.dtype
    ctx.save_for_backward(reshape_args[0], reshape_args[1])


def _reshape_advantages_backward(ctx, grad):
    """d(A_b w_bt)/dA = w (summed over t for [B] advantages); the weights are constants."""
    scores, score_mask = ctx.saved_tensors
    weights = torch.ops.oar.bilevel_weights(scores, score_mask, *ctx.reshape_args[2:])
    grad_advantages = grad * weights
    if len(ctx.advantages_shape) == 1:
        grad_advantages = grad_advantages.sum(dim=1)
    return (grad_advantages.to(ctx.advantages_dtype),) + (None,) * len(ctx.reshape_args)


torch.library.register_autograd(
    "oar::reshape_advantages",
    _reshape_advantages_backward,
    setup_context=_reshape_advantages_setup,
)


# -------------------------------------------------------------------------- public API


def check_advantages(advantages, like: torch.Tensor, *, like_name: str = "scores") -> None:
    """advantages must be a float [B] or [B, T] tensor on the device of `like` ([B, T])."""
    require_float_tensor("advantages", advantages)
    B, T = like.shape
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(
            f"advantages must be [B]={B} or [B, T]={(B, T)}, got {tuple(advantages.shape)}"
        )
    require_same_device(advantages=advantages, **{like_name: like})


def bilevel_weights(
    scores: torch.Tensor,
    score_mask: torch.Tensor,
    *,
    tau: float = TAU,
    beta: float = BETA,
    floor: float = FLOOR,
    preserve_mass: bool = True,
    check_finite: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bi-Level token weights from importance scores (SPEC section 6).

    scores: [B, T] any float dtype, finite where scored (negative scores count as 0).
    score_mask: [B, T] bool or int, the tokens whose weights are reshaped.
    check_finite: False skips the NaN/Inf check of the scores, which reads a flag back to the
    host (a sync per call on a GPU); non-finite scores then give unspecified weights.
    out: an optional float32 [B, T] buffer on the scores' device that receives the weights
    (any strides), for loops that keep their buffers, such as a captured CUDA graph.
    Returns [B, T] float32 (`out` when given): 1 outside score_mask, mean weight 1 over each
    row's scored tokens when preserve_mass. Weights are constants (no gradient flows to scores).
    """
    scores, mask, tau, beta, floor, preserve_mass = _check_args(
        scores, score_mask, tau, beta, floor, preserve_mass
    )
    check_finite = require_bool("check_finite", check_finite)
    if out is None:
        return torch.ops.oar.bilevel_weights(
            scores, mask, tau, beta, floor, preserve_mass, check_finite
        )
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    torch.ops.oar.bilevel_weights_into(
        scores, mask, tau, beta, floor, preserve_mass, out, check_finite
    )
    return out


def reshape_advantages(
    advantages: torch.Tensor,
    scores: torch.Tensor,
    score_mask: torch.Tensor,
    *,
    tau: float = TAU,
    beta: float = BETA,
    floor: float = FLOOR,
    preserve_mass: bool = True,
    check_finite: bool = True,
) -> torch.Tensor:
    """Per-token advantages A_{b,t} = A_b * w_{b,t} (SPEC sections 6 and 8).

    advantages: [B] (one per sequence, as GRPO computes) or [B, T], any float dtype.
    scores, score_mask, check_finite: as in `bilevel_weights` (check_finite=False also skips
    the check that the weighted advantages fit float32).
    Returns [B, T] float32. Positive and negative advantages get the same weights.
    """
    scores, mask, tau, beta, floor, preserve_mass = _check_args(
        scores, score_mask, tau, beta, floor, preserve_mass
    )
    check_advantages(advantages, scores)
    check_finite = require_bool("check_finite", check_finite)
    return torch.ops.oar.reshape_advantages(
        advantages.detach(), scores, mask, tau, beta, floor, preserve_mass, check_finite
    )
