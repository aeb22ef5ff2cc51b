"""The fused CUDA backend of token_logprobs and grpo_loss: logit tiles made by `tl.dot` and
consumed in registers (OAR_KERNELS_LOGPROB_BACKEND=fused; SPEC sections 7-8).

Forward: one kernel. Each program owns a block of rows and a contiguous split of vocabulary
tiles; it builds every [BLOCK_N, BLOCK_V] logit tile over H in float32, folds it into the
rows' running max / sum of exp / centred entropy sum / target logit, and writes only those
per-row partials. A few [splits, N] torch ops merge the splits. No logits reach memory, so
the forward costs one GEMM of reads and no [N, V] writes, and it is not rounded to bf16.

Backward: one kernel per chunk recomputes the logit tiles the same way and turns them into
d loss / d logits in registers, written once in the input dtype; cuBLAS then reduces the
chunk into d hidden and d weight (float32 sums across chunks), as the chunked backend does.
A fully fused backward (dH and dW accumulated by atomics from every tile) would add N*H*V/
BLOCK_V + V*H*N/BLOCK_N float32 atomic updates: ~1.6e11 at N=16384, H=4096, V=151936 with
128-wide tiles, more traffic than the chunk it saves. No tile skipping ("gradient
filtering"): it is not exact at the output dtype for rows with a nonzero incoming gradient.

Compared with the float64 reference in tests/test_logprobs_fused.py under the Triton
interpreter; the tile configs for real GPUs are autotuned per (H, V).
"""

from __future__ import annotations

import torch

from oar_kernels import logprobs
from oar_kernels._triton import INTERPRETED, on_device_of, tl, triton

# Tiles. The interpreter runs numpy per program, so wide tiles keep its loops short.
BLOCKS = {"interpreted": (16, 256, 32), "gpu": (64, 128)}  # (BLOCK_N, BLOCK_V[, BLOCK_K])
# The forward aims for this many programs per streaming multiprocessor (vocab splits make up
# for few row blocks: N=512 rows are 8 blocks of 64).
PROGRAMS_PER_SM = 2
INTERPRETED_SPLITS = 3  # exercises the merge of vocabulary splits under the interpreter


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's precision for float32 inputs follows torch's TF32 switch, as cuBLAS does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


if triton is not None:

    @triton.jit
    def _logit_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        rows,
        cols,
        H,
        stride_hidden,
        stride_weight,
        temperature,
        HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """z = (hidden[rows] @ weight[cols].T + bias[cols]) / T as a float32 [BLOCK_N, BLOCK_V]
        tile. Rows and columns out of range (masked by the caller) read as zero."""
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        row_base = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hidden
        col_base = weight_ptr + cols.to(tl.int64)[:, None] * stride_weight
        for k in range(0, H, BLOCK_K):
            k_ok = (k + ks) < H
            a = tl.load(row_base + k + ks[None, :], mask=k_ok[None, :], other=0.0)
            b = tl.load(col_base + k + ks[None, :], mask=k_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        return acc / temperature

    @triton.jit
    def _fused_fold_kernel(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        targets_ptr,
        max_ptr,
        sum_ptr,
        dot_ptr,
        target_z_ptr,
        N,
        V,
        H,
        stride_hidden,
        stride_weight,
        temperature,
        tiles_per_split,
        HAS_BIAS: tl.constexpr,
        WITH_ENTROPY: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Program (row block, split): folds the split's logit tiles into per-row partials
        at [split, row] (the same online statistics as logprobs.FoldState)."""
        split = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows = tl.where(row_ok, rows, 0)  # padded rows recompute row 0 and are not stored
        target = tl.load(targets_ptr + rows)
        run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        run_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        target_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
        first = split * tiles_per_split
        last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
        for tile in range(first, last):
            cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = _logit_tile(
                hidden_ptr,
                weight_ptr,
                bias_ptr,
                rows,
                tl.where(col_ok, cols, 0),
                H,
                stride_hidden,
                stride_weight,
                temperature,
                HAS_BIAS,
                PRECISION,
                BLOCK_N,
                BLOCK_V,
                BLOCK_K,
            )
            z = tl.where(col_ok[None, :], z, float("-inf"))  # padded vocab columns
            target_z += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            # As in logprobs._fold_torch: a max of -inf shifts by 0; p = 0 adds 0 to p * z.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(run_max - shift)
            e = tl.exp(z - shift[:, None])
            if WITH_ENTROPY:
                # Re-centre the old sum on the new max; rescale = 0 drops it (no 0 * -inf).
                moved = tl.where(rescale > 0.0, run_max - shift, 0.0)
                centred = e * tl.where(e > 0.0, z - shift[:, None], 0.0)
                run_dot = rescale * (run_dot + moved * run_sum) + tl.sum(centred, axis=1)
            run_sum = run_sum * rescale + tl.sum(e, axis=1)
            run_max = new_max
        at = split * N + rows
        tl.store(max_ptr + at, run_max, mask=row_ok)
        tl.store(sum_ptr + at, run_sum, mask=row_ok)
        if WITH_ENTROPY:
            tl.store(dot_ptr + at, run_dot, mask=row_ok)
        mine = row_ok & (target >= first * BLOCK_V) & (target < tl.minimum(last * BLOCK_V, V))
        tl.store(target_z_ptr + rows, target_z, mask=mine)

    @triton.jit
    def _fused_logits_grad_kernel(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        targets_ptr,
        lse_ptr,
        entropy_ptr,
        grad_logprobs_ptr,
        grad_entropy_ptr,
        out_ptr,
        R,
        C,
        H,
        stride_hidden,
        stride_weight,
        stride_out,
        temperature,
        HAS_BIAS: tl.constexpr,
        WITH_ENTROPY: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[R, C] = d loss / d logits of a chunk (rows x columns; targets relative to the
        chunk's first column), from logit tiles recomputed in registers."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok, col_ok = rows < R, cols < C
        rows, safe_cols = tl.where(row_ok, rows, 0), tl.where(col_ok, cols, 0)
        z = _logit_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            rows,
            safe_cols,
            H,
            stride_hidden,
            stride_weight,
            temperature,
            HAS_BIAS,
            PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        log_p = z - tl.load(lse_ptr + rows)[:, None]
        p = tl.exp(log_p)
        g_logp = tl.load(grad_logprobs_ptr + rows)[:, None]
        target = tl.load(targets_ptr + rows)[:, None]
        grad = tl.where(cols[None, :] == target, g_logp, 0.0) - g_logp * p
        silent = g_logp == 0.0
        if WITH_ENTROPY:
            g_ent = tl.load(grad_entropy_ptr + rows)[:, None]
            entropy = tl.load(entropy_ptr + rows)[:, None]
            grad -= g_ent * tl.where(p > 0.0, p * (log_p + entropy), 0.0)
            silent = silent & (g_ent == 0.0)
        # A row nothing flows into (padding) gives exactly 0, even if its logits hold NaN.
        grad = tl.where(silent, 0.0, grad / temperature)
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    if INTERPRETED:
        _fold_launch, _grad_launch = _fused_fold_kernel, _fused_logits_grad_kernel
    else:
        # BLOCK_N and BLOCK_V are fixed (the forward's split count depends on them); the
        # reduction depth and the pipelining are tuned once per (H, V) on the device.
        _TUNED = [
            triton.Config({"BLOCK_K": k}, num_warps=w, num_stages=s)
            for k, w, s in ((64, 8, 3), (64, 4, 4), (32, 8, 4), (128, 8, 2))
        ]
        _fold_launch = triton.autotune(_TUNED, key=["H", "V", "HAS_BIAS", "WITH_ENTROPY"])(
            _fused_fold_kernel
        )
        _grad_launch = triton.autotune(_TUNED, key=["H", "C", "HAS_BIAS", "WITH_ENTROPY"])(
            _fused_logits_grad_kernel
        )


def _blocks() -> dict:
    """The launch's tile constexprs (BLOCK_K too under the interpreter; autotuned on a GPU)."""
    if INTERPRETED:
        n, v, k = BLOCKS["interpreted"]
        return {"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k}
    n, v = BLOCKS["gpu"]
    return {"BLOCK_N": n, "BLOCK_V": v}


def _splits(row_blocks: int, vocab_tiles: int, device: torch.device) -> int:
    if INTERPRETED:
        wanted = INTERPRETED_SPLITS
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = -(-PROGRAMS_PER_SM * sms // row_blocks)
    return max(1, min(vocab_tiles, wanted))


def _merge_splits(partial_max, partial_sum, partial_dot, target_z, with_entropy):
    """Merges per-split fold statistics [S, N] into one logprobs.FoldState over all columns."""
    run_max = partial_max.amax(dim=0)
    shift = torch.where(run_max == -torch.inf, 0.0, run_max)
    rescale = torch.exp(partial_max - shift)
    run_sum = (partial_sum * rescale).sum(dim=0)
    if with_entropy:
        # Splits whose max is -inf (all p = 0) drop out, as rescale = 0 does in the fold.
        moved = torch.where(rescale > 0, partial_max - shift, 0.0)
        run_dot = (rescale * (partial_dot + moved * partial_sum)).sum(dim=0)
    else:
        run_dot = partial_dot
    return logprobs.FoldState(0, None, None, False, _views=(run_max, run_sum, run_dot, target_z))


def fused_forward(hidden, weight, targets, bias, temperature, return_entropy):
    """(logprobs [N], entropy [N] or [0], lse [N]) float32, without logits in memory.

    hidden [N, H] and weight [V, H] contiguous, targets [N] int64 checked by the caller."""
    rows, width = hidden.shape
    vocab = weight.shape[0]
    blocks = _blocks()
    row_blocks = triton.cdiv(rows, blocks["BLOCK_N"])
    vocab_tiles = triton.cdiv(vocab, blocks["BLOCK_V"])
    splits = _splits(row_blocks, vocab_tiles, hidden.device)
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    splits = triton.cdiv(vocab_tiles, tiles_per_split)  # no split without tiles
    f32 = dict(dtype=torch.float32, device=hidden.device)
    # One NaN-filled buffer (one launch): a [split, row] the kernel missed reads as NaN.
    partials = torch.full((3 if return_entropy else 2, splits, rows), float("nan"), **f32)
    partial_max, partial_sum = partials[0], partials[1]
    partial_dot = partials[2] if return_entropy else partials[:0, 0]
    # NaN until the split holding the target stores it: a missed one cannot pass as a value.
    target_z = torch.full((rows,), float("nan"), **f32)
    if rows:
        with on_device_of(hidden):
            _fold_launch[(row_blocks, splits)](
                hidden,
                weight,
                weight if bias is None else bias,
                targets,
                partial_max,
                partial_sum,
                partial_dot if return_entropy else partial_sum,
                target_z,
                rows,
                vocab,
                width,
                hidden.stride(0),
                weight.stride(0),
                temperature,
                tiles_per_split,
                HAS_BIAS=bias is not None,
                WITH_ENTROPY=return_entropy,
                PRECISION=_precision(hidden.dtype),
                **blocks,
            )
    state = _merge_splits(partial_max, partial_sum, partial_dot, target_z, return_entropy)
    logprobs_, lse = torch.empty(rows, **f32), torch.empty(rows, **f32)
    entropy = torch.empty(rows if return_entropy else 0, **f32)
    state.finish(logprobs_, lse, entropy if return_entropy else None)
    return logprobs_, entropy, lse


def _chunk_logits_grad(
    out, hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy, temperature
):
    """Writes d loss / d logits of hidden [R, H] x weight [C, H] (views of one chunk) to out."""
    if out.numel() == 0:
        return
    blocks = _blocks()
    with_entropy = grad_entropy is not None
    grid = (
        triton.cdiv(out.shape[0], blocks["BLOCK_N"]),
        triton.cdiv(out.shape[1], blocks["BLOCK_V"]),
    )
    with on_device_of(out):
        _grad_launch[grid](
            hidden,
            weight,
            weight if bias is None else bias,
            targets,
            lse,
            entropy if with_entropy else lse,
            grad_logprobs,
            grad_entropy if with_entropy else grad_logprobs,
            out,
            out.shape[0],
            out.shape[1],
            hidden.shape[1],
            hidden.stride(0),
            weight.stride(0),
            out.stride(0),
            temperature,
            HAS_BIAS=bias is not None,
            WITH_ENTROPY=with_entropy,
            PRECISION=_precision(hidden.dtype),
            **blocks,
        )


def fused_backward(
    grad_logprobs, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature
):
    """(d hidden, d weight, d bias) of token_logprobs' op: each chunk of the logits gradient
    is written by one kernel from recomputed tiles, then reduced by two cuBLAS GEMMs."""
    if grad_entropy.numel() == 0:
        entropy = grad_entropy = None

    def chunk_grad(rows: slice, cols: slice) -> torch.Tensor:
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        out = torch.empty(shape, dtype=hidden.dtype, device=hidden.device)
        _chunk_logits_grad(
            out,
            hidden[rows],
            weight[cols],
            None if bias is None else bias[cols],
            targets[rows] - cols.start,
            lse[rows],
            None if entropy is None else entropy[rows],
            grad_logprobs[rows],
            None if grad_entropy is None else grad_entropy[rows],
            temperature,
        )
        return out

    return logprobs.reduce_chunk_grads(hidden, weight, bias is not None, chunk_grad)
