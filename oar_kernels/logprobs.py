"""Per-token log-probabilities through the lm head without [N, V] logits (SPEC sections 7-8).

One file holds the op family: the float64 reference, the chunked driver shared by every
device, the per-chunk "fold" (logits -> logprob, logsumexp, entropy) and "logits gradient"
steps as torch code (CPU) and Triton kernels (CUDA), and the registration of
`oar::token_logprobs` with its autograd.

The forward walks chunks of logits (vocabulary chunks of all rows when V >= N, else row
chunks): each is made by one GEMM, folded into per-row running softmax statistics
(FoldState) and dropped. The backward recomputes each chunk, turns it into the logits
gradient in place, and two GEMMs reduce it into the hidden and weight gradients, summed over
chunks in float32. No chunk exceeds CHUNK_BYTES of float32 logits (bar the minimum sizes).
"""

from __future__ import annotations

import os

import torch

from oar_kernels._checks import (
    require_bool,
    require_float_tensor,
    require_real_in,
    require_same_device,
    require_tensor,
)
from oar_kernels._ops import lib
from oar_kernels._triton import INTERPRETED, on_device_of, tl, triton

# Bytes of chunk logits the driver keeps alive at once (float32 logits of rows x V).
CHUNK_BYTES = {"cpu": 8 * 2**20, "cuda": 512 * 2**20}
# Fewer rows (columns) than this make the GEMMs inefficient; the budget may be exceeded.
MIN_CHUNK_ROWS = 32
MIN_CHUNK_COLS = 256
BLOCK_V = 4096
# Logits are divided by the temperature; below this they overflow float32 for any |logit| > 1e32.
MIN_TEMPERATURE = 1e-6


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other float dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(rows: int, vocab: int, device: torch.device) -> int:
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    return max(1, min(rows, max(MIN_CHUNK_ROWS, budget // (4 * vocab))))


# ---------------------------------------------------------------------------- reference


def token_logprobs_reference(hidden, weight, targets, *, bias=None, temperature=1.0):
    """Float64 full-logits transcription: returns (logprobs [N], entropy [N]) float64."""
    logits = hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logprobs = logp_all.gather(1, targets.reshape(-1, 1)).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs.reshape(targets.shape), entropy.reshape(targets.shape)


# ----------------------------------------------------------------- per-chunk torch steps


def _scaled(logits, dtype, temperature, *, in_place):
    """logits / temperature in `dtype`; in_place may reuse the logits' memory."""
    z = logits.to(dtype)
    if temperature == 1.0:
        return z
    return z.div_(temperature) if in_place else z / temperature


LOG2_E = 1.4426950408889634


def _centred(logits, shift, temperature, *, out):
    """out = logits / temperature - shift[:, None] in out's float dtype (out may be logits)."""
    if temperature == 1.0 and logits.dtype == out.dtype:
        return torch.sub(logits, shift[:, None], out=out)
    # Half-precision logits are converted first: a mixed-dtype sub takes an unvectorised
    # path on CPU (6x slower than the conversion), and a half division rounds before the cast.
    if out is not logits:
        out.copy_(logits)
    if temperature != 1.0:
        out.div_(temperature)
    return out.sub_(shift[:, None])


def _exp_(centred):
    """exp in place, as exp2(x log2 e): the CPU's exp2 runs ~2.5x faster than its exp, for one
    more rounding (a relative error of |x| 2^-24 on a value of e^x, x centred <= ~0)."""
    return centred.mul_(LOG2_E).exp2_()


class FoldState:
    """Per-row softmax statistics folded over column chunks: running max of z = logits / T,
    sum of exp(z - max), sum of exp(z - max) * (z - max) (for the entropy) and the target's z.

    Centring the entropy's sum on the max keeps every term in [-1/e, 0]: a sum of p * z
    would overflow (and cancel against the logsumexp) for logits near float32's limits."""

    def __init__(self, rows: int, dtype: torch.dtype, device, with_entropy: bool, *, _views=None):
        self._work = [None]  # shared with the row views
        # Bytes the torch fold's float buffer may take (None: a whole chunk's worth); a cap
        # makes the fold go through the chunk in column blocks.
        self.work_bytes = None
        if _views is not None:
            self.max, self.sum, self.dot, self.target = _views
            return
        self.max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.sum = torch.zeros(rows, dtype=dtype, device=device)
        self.dot = torch.zeros(rows if with_entropy else 0, dtype=dtype, device=device)
        # NaN until the chunk holding the target is folded: a missed one cannot pass as a value.
        self.target = torch.full((rows,), float("nan"), dtype=dtype, device=device)

    def rows(self, chunk: slice) -> "FoldState":
        """A view of some rows; folding into it updates this state."""
        dot = self.dot[chunk] if self.dot.numel() else self.dot
        view = FoldState(
            0, None, None, False, _views=(self.max[chunk], self.sum[chunk], dot, self.target[chunk])
        )
        view._work, view.work_bytes = self._work, self.work_bytes
        return view

    def work(self, shape) -> torch.Tensor:
        """A float buffer of `shape` for the torch fold, reused by every chunk of the walk (a
        fresh chunk-sized tensor per chunk costs page faults on CPU)."""
        numel = shape[0] * shape[1]
        if self._work[0] is None or self._work[0].numel() < numel:
            self._work[0] = self.max.new_empty(numel)
        return self._work[0][:numel].view(shape)

    def finish(self, logprobs, lse, entropy=None) -> None:
        log_sum = torch.log(self.sum)
        torch.add(self.max, log_sum, out=lse)
        # (z_t - max) - log sum, not z_t - lse: exact even where lse rounds (|logits| ~1e38).
        torch.sub(self.target - self.max, log_sum, out=logprobs)
        if entropy is not None:
            torch.sub(torch.log(self.sum), self.dot / self.sum, out=entropy)


# Bytes of float buffer the torch fold takes beside the chunk where that buffer must stay
# small (FoldState.work_bytes: grpo_loss's one walk); it then goes through the chunk in column
# blocks of this size.
WORK_BYTES = 2**20


def _column_blocks(shape, itemsize: int, budget: int | None):
    """Column slices of a [rows, cols] chunk whose float work fits `budget` bytes (None: one)."""
    rows, cols = shape
    width = cols if budget is None else max(1, budget // (itemsize * max(rows, 1)))
    return [slice(start, min(cols, start + width)) for start in range(0, cols, width)]


def _fold_torch(logits, targets, temperature, state: FoldState):
    """Folds a chunk of columns into `state`; targets are relative to the chunk's first column.

    Reads the logits and leaves them intact (the fused loss turns them into gradients next),
    in column blocks when state.work_bytes caps its buffer.
    """
    for cols in _column_blocks(logits.shape, state.max.element_size(), state.work_bytes):
        _fold_block(logits[:, cols], targets - cols.start, temperature, state)


def _fold_block(logits, targets, temperature, state: FoldState):
    acc = state.max.dtype
    inside = (targets >= 0) & (targets < logits.shape[1])
    picked = logits.gather(1, targets.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
    picked = _scaled(picked, acc, temperature, in_place=True)
    new_max = torch.maximum(state.max, _scaled(logits.amax(dim=1), acc, temperature, in_place=True))
    # Logits of -inf (masked vocabulary) have p = 0: shifting by a max of -inf would make
    # exp(-inf - -inf) NaN, and their p * z must count as 0, not 0 * -inf.
    shift = torch.where(new_max == -torch.inf, 0.0, new_max)
    rescale = torch.exp(state.max - shift)
    centred = _centred(logits, shift, temperature, out=state.work(logits.shape))
    if state.dot.numel():
        e = _exp_(centred.clone())
        # Re-centre the old sum on the new max; rescale = 0 drops it (and any 0 * inf).
        moved = rescale * (state.dot + (state.max - shift) * state.sum)
        products = torch.where(e > 0, e.mul(centred), 0.0)
        state.dot.copy_(torch.where(rescale > 0, moved, 0.0).add_(products.sum(dim=1)))
    else:
        e = _exp_(centred)
    state.sum.mul_(rescale).add_(e.sum(dim=1))
    state.max.copy_(new_max)
    state.target.copy_(torch.where(inside, picked, state.target))


def _logits_grad_torch(logits, targets, lse, entropy, grad_logprobs, grad_entropy, temperature):
    """Overwrites the chunk's logits with d(loss)/d(logits): in place for float32 (float64)
    logits, through one float32 chunk buffer for half precision."""
    work = logits if logits.dtype == lse.dtype else logits.new_empty(logits.shape, dtype=lse.dtype)
    log_p = _centred(logits, lse, temperature, out=work)
    # The 1 / temperature of d z / d logits is folded into the per-row factors.
    grad_logprobs = (grad_logprobs / temperature)[:, None]
    if grad_entropy is not None:
        # dH/dz_j = -p_j (log p_j + H). Where p_j = 0 (a logit of -inf) the term is 0, not
        # 0 * -inf: log p_j is replaced by -H there.
        p = _exp_(log_p.clone())
        neg_entropy = -entropy[:, None]
        torch.where(p > 0, log_p, neg_entropy, out=log_p)
        grad = log_p.sub_(neg_entropy).mul_(p).mul_((-grad_entropy / temperature)[:, None])
        grad.addcmul_(p, grad_logprobs, value=-1.0)
    else:
        grad = _exp_(log_p).mul_(-grad_logprobs)
    # Targets are relative to the chunk's first column; those outside it contribute nothing.
    inside = (targets >= 0) & (targets < grad.shape[1])
    grad.scatter_add_(
        1, targets.clamp(0, grad.shape[1] - 1)[:, None], grad_logprobs * inside[:, None]
    )
    # A row nothing flows into (padding) gives exactly 0, even if its logits hold NaN: its
    # terms are p * 0, and the NaN of NaN * 0 becomes 0 (a row that gradient flows into and
    # whose logits hold NaN has a NaN logprob already). One cheap pass, where a row mask
    # broadcast over the chunk costs as much as the exp.
    grad.nan_to_num_(0.0, torch.inf, -torch.inf)
    if grad is not logits:
        logits.copy_(grad)


# -------------------------------------------------------------------- Triton chunk steps

if triton is not None:

    @triton.jit
    def _fold_kernel(
        logits_ptr,
        stride_row,
        targets_ptr,
        max_ptr,
        sum_ptr,
        dot_ptr,
        target_z_ptr,
        V,
        temperature,
        WITH_ENTROPY: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: folds a chunk of columns into the row's running statistics
        (online logsumexp, and sum p*z for the entropy) over vocab tiles."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        run_max = tl.load(max_ptr + row)
        run_sum = tl.load(sum_ptr + row)
        if WITH_ENTROPY:
            run_dot = tl.load(dot_ptr + row)  # sum of exp(z - max) * (z - max)
        for start in range(0, V, BLOCK_V):
            in_vocab = start + cols < V  # padded vocab columns read as -inf
            z = tl.load(base + start + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
            z = z / temperature
            new_max = tl.maximum(run_max, tl.max(z, axis=0))
            # As in _fold_torch: a max of -inf shifts by 0, and p = 0 contributes 0 to p * z.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(run_max - shift)
            e = tl.exp(z - shift)
            if WITH_ENTROPY:
                moved = rescale * (run_dot + (run_max - shift) * run_sum)
                centred = tl.where(e > 0.0, e * (z - shift), 0.0)
                run_dot = tl.where(rescale > 0.0, moved, 0.0) + tl.sum(centred, axis=0)
            run_sum = run_sum * rescale + tl.sum(e, axis=0)
            run_max = new_max
        tl.store(max_ptr + row, run_max)
        tl.store(sum_ptr + row, run_sum)
        if WITH_ENTROPY:
            tl.store(dot_ptr + row, run_dot)
        target = tl.load(targets_ptr + row)  # relative to this chunk's first column
        inside = (target >= 0) & (target < V)
        z_target = tl.load(base + target, mask=inside, other=0.0).to(tl.float32) / temperature
        tl.store(target_z_ptr + row, z_target, mask=inside)

    @triton.jit
    def _logits_grad_kernel(
        logits_ptr,
        stride_row,
        targets_ptr,
        lse_ptr,
        entropy_ptr,
        grad_logprobs_ptr,
        grad_entropy_ptr,
        V,
        temperature,
        WITH_ENTROPY: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        lse = tl.load(lse_ptr + row)
        target = tl.load(targets_ptr + row)
        g_logp = tl.load(grad_logprobs_ptr + row)
        if WITH_ENTROPY:
            g_ent = tl.load(grad_entropy_ptr + row)
            entropy = tl.load(entropy_ptr + row)
        for start in range(0, V, BLOCK_V):
            in_vocab = start + cols < V
            z = tl.load(base + start + cols, mask=in_vocab, other=0.0).to(tl.float32) / temperature
            log_p = z - lse
            p = tl.exp(log_p)
            grad = tl.where(start + cols == target, g_logp, 0.0) - g_logp * p
            if WITH_ENTROPY:
                grad -= g_ent * tl.where(p > 0.0, p * (log_p + entropy), 0.0)
            grad = grad / temperature
            # A row nothing flows into (padding) gives exactly 0, even if its logits hold NaN.
            if WITH_ENTROPY:
                grad = tl.where((g_logp == 0.0) & (g_ent == 0.0), 0.0, grad)
            else:
                grad = tl.where(g_logp == 0.0, 0.0, grad)
            tl.store(base + start + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_vocab)


def _vocab_block(vocab: int) -> int:
    return min(BLOCK_V, triton.next_power_of_2(vocab))


def _fold_triton(logits, targets, temperature, state: FoldState):
    with_entropy = state.dot.numel() > 0
    with on_device_of(logits):
        _fold_kernel[(logits.shape[0],)](
            logits,
            logits.stride(0),
            targets,
            state.max,
            state.sum,
            state.dot if with_entropy else state.sum,
            state.target,
            logits.shape[1],
            temperature,
            WITH_ENTROPY=with_entropy,
            BLOCK_V=_vocab_block(logits.shape[1]),
        )


def _logits_grad_triton(logits, targets, lse, entropy, grad_logprobs, grad_entropy, temperature):
    with_entropy = grad_entropy is not None
    with on_device_of(logits):
        _logits_grad_kernel[(logits.shape[0],)](
            logits,
            logits.stride(0),
            targets,
            lse,
            entropy if with_entropy else lse,
            grad_logprobs,
            grad_entropy if with_entropy else grad_logprobs,
            logits.shape[1],
            temperature,
            WITH_ENTROPY=with_entropy,
            BLOCK_V=_vocab_block(logits.shape[1]),
        )


# ------------------------------------------------------------------------ chunked driver


def chunk_logits(hidden_rows, weight, bias, out=None):
    """hidden_rows @ weight.T + bias, written into `out` when given."""
    if bias is None:
        return torch.mm(hidden_rows, weight.T, out=out)
    return torch.addmm(bias, hidden_rows, weight.T, out=out)


# Device type -> whether torch.addmm takes half operands with a float32 out_dtype there
# (cuBLAS in recent torch; not the CPU). Probed by the first half-precision call.
_FLOAT_OUT_GEMM: dict[str, bool] = {"cpu": False}


def _float_out_addmm(acc, a, b) -> bool:
    kind = acc.device.type
    if not _FLOAT_OUT_GEMM.get(kind, True):
        return False
    try:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):  # checked before any launch
        _FLOAT_OUT_GEMM[kind] = False
        return False
    _FLOAT_OUT_GEMM[kind] = True
    return True


def add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b. Half-precision products stay half-precision GEMMs (tensor cores) summed in
    acc's float32: straight into acc where the GEMM can write float32 (CUDA), else each chunk's
    product is rounded once through a half-precision temporary (converted before the add: a
    mixed-dtype add is unvectorised on CPU)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif not _float_out_addmm(acc, a, b):
        acc += (a @ b).to(acc.dtype)


def row_chunks(rows: int, vocab: int, device: torch.device):
    """Slices of at most `_chunk_rows` rows covering [0, rows)."""
    step = _chunk_rows(rows, vocab, device)
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


def vocab_chunks(rows: int, vocab: int, device: torch.device):
    """Slices of vocabulary columns whose [rows, cols] float32 logits fit the budget."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    step = max(1, min(vocab, max(MIN_CHUNK_COLS, budget // (4 * max(rows, 1)))))
    return [slice(start, min(vocab, start + step)) for start in range(0, vocab, step)]


def _length(span: slice) -> int:
    return span.stop - span.start


def logit_chunks(hidden, weight, bias, *, by_vocab: bool):
    """(rows, cols, logits [rows, cols]) chunk after chunk: vocabulary chunks of all rows
    (by_vocab), else row chunks of all columns. Every chunk is written into one buffer (a
    fresh chunk-sized tensor each costs page faults on CPU): a chunk is valid until the next."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    if by_vocab:
        spans = [(slice(0, rows), cols) for cols in vocab_chunks(rows, vocab, hidden.device)]
    else:
        spans = [(chunk, slice(0, vocab)) for chunk in row_chunks(rows, vocab, hidden.device)]
    buffer = hidden.new_empty(_length(spans[0][0]) * _length(spans[0][1]))  # the largest
    for chunk, cols in spans:
        out = buffer[: _length(chunk) * _length(cols)].view(_length(chunk), _length(cols))
        part_bias = None if bias is None else bias[cols]
        yield chunk, cols, chunk_logits(hidden[chunk], weight[cols], part_bias, out=out)


# Devices whose checks of values must not read them back to the host (a sync per call, and an
# error under CUDA graph capture): they assert on the device, failing at the next
# synchronisation. Tests add "cpu" to run that path without a GPU.
DEVICE_ASSERTS = ("cuda",)


def check_targets(targets: torch.Tensor, vocab: int) -> None:
    """targets in [0, vocab): a ValueError, or a device-side assert on DEVICE_ASSERTS."""
    # Checked inside op implementations, not in public wrappers: reading values would break a
    # compiled graph.
    if not targets.numel():
        return
    inside = ((targets >= 0) & (targets < vocab)).all()
    message = f"targets must lie in [0, {vocab})"
    if targets.device.type in DEVICE_ASSERTS:
        torch._assert_async(inside, message)
    elif not bool(inside):
        raise ValueError(message)


class LmHeadGrads:
    """Sums d loss / d (hidden, weight, bias) over chunks of the logits gradient.

    Over vocabulary chunks (by_vocab) d hidden sums across chunks, in float32 (float64 for
    float64 inputs), and each chunk writes its columns of d weight and d bias; over row chunks
    d weight and d bias sum in float32 and each chunk writes its rows of d hidden. Written
    parts are NaN-filled first, so a chunk the walk missed cannot pass as a value.

    active: [N] bool or None, the rows whose hidden states enter the d weight GEMM; the others
    enter as zeros (padding holding NaN would reach d weight as 0 * NaN). Row chunks mask
    their own rows; vocabulary chunks share one masked copy.
    """

    def __init__(self, hidden, weight, with_bias: bool, *, by_vocab: bool = False, active=None):
        acc, nan = accumulation_dtype(weight.dtype), float("nan")
        if active is not None and by_vocab:
            hidden, active = torch.where(active[:, None], hidden, 0.0), None
        self.hidden, self.weight, self.by_vocab, self.active = hidden, weight, by_vocab, active
        on = {"device": weight.device}
        bias_shape = (weight.shape[0] if with_bias else 0,)
        if by_vocab:
            self.grad_hidden = torch.zeros(hidden.shape, dtype=acc, **on)
            self.grad_weight = torch.full(weight.shape, nan, dtype=weight.dtype, **on)
            self.grad_bias = torch.full(bias_shape, nan, dtype=weight.dtype, **on)
        else:
            self.grad_hidden = torch.full(hidden.shape, nan, dtype=hidden.dtype, **on)
            self.grad_weight = torch.zeros(weight.shape, dtype=acc, **on)
            self.grad_bias = torch.zeros(bias_shape, dtype=acc, **on)

    def add(self, rows: slice, logits_grad: torch.Tensor, cols: slice = slice(None)) -> None:
        acc = accumulation_dtype(self.weight.dtype)
        weight, hidden = self.weight[cols], self.hidden[rows]
        if self.active is not None:
            hidden = torch.where(self.active[rows, None], hidden, 0.0)
        if self.by_vocab:
            add_matmul(self.grad_hidden, logits_grad, weight)
            torch.mm(logits_grad.T, hidden, out=self.grad_weight[cols])
            if self.grad_bias.numel():
                self.grad_bias[cols] = logits_grad.sum(dim=0, dtype=acc)
            return
        torch.mm(logits_grad, weight, out=self.grad_hidden[rows])
        # In place: a [V, H] temporary per chunk would cost as much as the logits we avoid.
        add_matmul(self.grad_weight, logits_grad.T, hidden)
        if self.grad_bias.numel():
            self.grad_bias += logits_grad.sum(dim=0, dtype=acc)

    def result(self):
        dtype = self.weight.dtype
        grad_hidden = self.grad_hidden.to(self.hidden.dtype)
        return grad_hidden, self.grad_weight.to(dtype), self.grad_bias.to(dtype)


def by_vocab(rows: int, vocab: int) -> bool:
    """Walk vocabulary chunks of all rows when V >= N (few tall GEMMs, and the gradient summed
    across chunks is the smaller d hidden [N, H]), else row chunks."""
    return vocab >= rows


def chunked_forward(hidden, weight, targets, bias, temperature, return_entropy, fold):
    """Folds the logits chunk by chunk into per-row softmax statistics."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    targets = targets.long()  # gather and scatter index with int64; any integer dtype comes in
    check_targets(targets, vocab)
    acc = accumulation_dtype(hidden.dtype)
    state = FoldState(rows, acc, hidden.device, return_entropy)
    for chunk, cols, logits in logit_chunks(hidden, weight, bias, by_vocab=by_vocab(rows, vocab)):
        fold(logits, targets[chunk] - cols.start, temperature, state.rows(chunk))
    logprobs, lse = torch.empty_like(state.max), torch.empty_like(state.max)
    entropy = torch.empty_like(state.dot)
    state.finish(logprobs, lse, entropy if return_entropy else None)
    return logprobs, entropy, lse


def _rows(tensor, chunk):
    return None if tensor is None else tensor[chunk]


def chunked_backward(
    grad_logprobs,
    grad_entropy,
    hidden,
    weight,
    targets,
    bias,
    lse,
    entropy,
    temperature,
    logits_grad,
):
    """Recomputes the logits chunk by chunk, turns each into its gradient in place and
    reduces that by two GEMMs (LmHeadGrads)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    targets = targets.long()  # gather and scatter index with int64; any integer dtype comes in
    if grad_entropy.numel() == 0:
        entropy = grad_entropy = None
    walk = by_vocab(rows, vocab)
    grads = LmHeadGrads(hidden, weight, bias is not None, by_vocab=walk)
    for chunk, cols, logits in logit_chunks(hidden, weight, bias, by_vocab=walk):
        logits_grad(
            logits,
            targets[chunk] - cols.start,
            lse[chunk],
            _rows(entropy, chunk),
            grad_logprobs[chunk],
            _rows(grad_entropy, chunk),
            temperature,
        )
        grads.add(chunk, logits, cols)
    return grads.result()


def reduce_chunk_grads(hidden, weight, with_bias: bool, chunk_grad):
    """(d hidden, d weight, d bias) from chunks of the logits gradient that
    chunk_grad(rows: slice, cols: slice) returns as [rows, cols] tensors; walked along the
    longer of rows and vocabulary as chunked_backward does (the fused backend's reducer)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    if vocab < rows:
        grads = LmHeadGrads(hidden, weight, with_bias)
        for chunk in row_chunks(rows, vocab, hidden.device):
            grads.add(chunk, chunk_grad(chunk, slice(0, vocab)))
        return grads.result()
    acc = accumulation_dtype(weight.dtype)
    grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    # NaN-filled so a column range the chunk walk missed cannot pass as a value.
    grad_weight = torch.full(weight.shape, float("nan"), dtype=weight.dtype, device=weight.device)
    grad_bias = torch.full(
        (vocab if with_bias else 0,), float("nan"), dtype=weight.dtype, device=weight.device
    )
    for cols in vocab_chunks(rows, vocab, hidden.device):
        grad = chunk_grad(slice(0, rows), cols)
        add_matmul(grad_hidden, grad, weight[cols])
        torch.mm(grad.T, hidden, out=grad_weight[cols])
        if with_bias:
            grad_bias[cols] = grad.sum(dim=0, dtype=acc)
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias


# ------------------------------------------------------------------------ registration

CPU_BACKEND = "chunked BLAS GEMM + torch logsumexp"
CUDA_BACKEND = (
    "chunked cuBLAS GEMM + Triton fold" if triton is not None else "chunked cuBLAS GEMM + torch"
)
FUSED_CUDA_BACKEND = "fused Triton GEMM+logsumexp fwd, Triton recompute + cuBLAS bwd"
# The CUDA backend of token_logprobs and grpo_loss, read at every call. "fused" stays opt-in
# until a committed GPU measurement shows it faster (issue 12); CPU always runs chunked.
BACKEND_VARIABLE = "OAR_KERNELS_LOGPROB_BACKEND"
LOGPROB_BACKENDS = ("chunked", "fused")


def logprob_backend() -> str:
    """The backend named by OAR_KERNELS_LOGPROB_BACKEND ("chunked" when unset)."""
    name = os.environ.get(BACKEND_VARIABLE, "chunked").strip().lower() or "chunked"
    if name not in LOGPROB_BACKENDS:
        raise ValueError(f"{BACKEND_VARIABLE} must be one of {LOGPROB_BACKENDS}, got {name!r}")
    return name


def backend_name(device: str) -> str:
    """What token_logprobs runs on `device` ("cpu" or "cuda") under the current
    OAR_KERNELS_LOGPROB_BACKEND."""
    fused = logprob_backend() == "fused" and triton is not None
    if device == "cuda":
        return FUSED_CUDA_BACKEND if fused else CUDA_BACKEND
    return f"{FUSED_CUDA_BACKEND} (interpreted)" if fused and INTERPRETED else CPU_BACKEND


def uses_fused(hidden: torch.Tensor) -> bool:
    """The fused kernels serve CUDA float32/half inputs when selected (CPU inputs too under
    TRITON_INTERPRET=1, which is how they are tested); float64 (gradcheck) and CPU inputs
    take the chunked walk."""
    return (
        triton is not None
        and (hidden.is_cuda or INTERPRETED)
        and hidden.dtype != torch.float64
        and logprob_backend() == "fused"
    )


def lm_head_forward(hidden, weight, targets, bias, temperature, return_entropy):
    """(logprobs, entropy, lse) through the selected backend; targets already int64."""
    if uses_fused(hidden):
        from oar_kernels import logprobs_fused

        check_targets(targets, weight.shape[0])
        return logprobs_fused.fused_forward(
            hidden, weight, targets, bias, temperature, return_entropy
        )
    fold, _ = chunk_steps(hidden)
    return chunked_forward(hidden, weight, targets, bias, temperature, return_entropy, fold)


def lm_head_backward(*args):
    """(d hidden, d weight, d bias) through the selected backend; args as
    token_logprobs_backward's."""
    if uses_fused(args[2]):
        from oar_kernels import logprobs_fused

        return logprobs_fused.fused_backward(*args)
    _, logits_grad = chunk_steps(args[2])
    return chunked_backward(*args, logits_grad=logits_grad)


def chunk_steps(hidden: torch.Tensor):
    """(fold, logits_grad) for the chunk steps on hidden's device and dtype.

    The Triton steps compute in float32; float64 inputs (gradcheck) take the torch steps.
    """
    if triton is not None and hidden.is_cuda and hidden.dtype != torch.float64:
        return _fold_triton, _logits_grad_triton
    return _fold_torch, _logits_grad_torch


def check_op_args(hidden, weight, targets, bias, temperature) -> None:
    """What the token_logprobs and grpo_loss kernels need, checked in the ops themselves:
    callers of torch.ops.oar.* bypass the public wrappers (target values: check_targets)."""
    check_lm_head(hidden, weight, targets, bias, temperature, hidden_dims=(2,))


def _token_logprobs_impl(hidden, weight, targets, bias, temperature, return_entropy):
    check_op_args(hidden, weight, targets, bias, temperature)
    return lm_head_forward(hidden, weight, targets.long(), bias, temperature, return_entropy)


def _token_logprobs_backward_impl(*args):
    grad_logprobs, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature = args
    # Target values were checked by the forward; the shapes are checked again for raw callers.
    check_op_args(hidden, weight, targets, bias, temperature)
    rows = hidden.shape[:1]
    for name, value in (("grad_logprobs", grad_logprobs), ("lse", lse)):
        if value.shape != rows:
            raise ValueError(f"{name} must be [N]={rows[0]}, got {tuple(value.shape)}")
    for name, value in (("grad_entropy", grad_entropy), ("entropy", entropy)):
        if grad_entropy.numel() and value.shape != rows:
            raise ValueError(f"{name} must be [N]={rows[0]} (or [0]), got {tuple(value.shape)}")
    return lm_head_backward(*args[:4], targets.long(), *args[5:])


for _key in ("CPU", "CUDA"):
    lib.impl("token_logprobs", _token_logprobs_impl, _key)
    lib.impl("token_logprobs_backward", _token_logprobs_backward_impl, _key)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, _ = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)  # saved for the backward; not an output users train on
    ctx.save_for_backward(hidden, weight, targets, bias, lse, entropy)
    ctx.temperature = temperature


def _autograd_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if grad_entropy is None or entropy.numel() == 0:
        grad_entropy = lse.new_empty(0)
    grad_hidden, grad_weight, grad_bias = torch.ops.oar.token_logprobs_backward(
        grad_logprobs.contiguous(),
        grad_entropy.contiguous(),
        hidden,
        weight,
        targets,
        bias,
        lse,
        entropy,
        ctx.temperature,
    )
    return grad_hidden, grad_weight, None, grad_bias if bias is not None else None, None, None


torch.library.register_autograd(
    "oar::token_logprobs", _autograd_backward, setup_context=_setup_context
)


# -------------------------------------------------------------------------- public API


def check_lm_head(hidden, weight, targets, bias, temperature, *, hidden_dims) -> float:
    """The lm-head arguments of token_logprobs and grpo_loss: hidden [..., H] with a rank in
    `hidden_dims`, weight [V, H] (V >= 1) of hidden's dtype, integer targets shaped like
    hidden[..., 0], bias [V] or None, all on one device, temperature >= MIN_TEMPERATURE.
    Returns the temperature as a float. Target values are checked by the op."""
    require_float_tensor("hidden", hidden)
    require_float_tensor("weight", weight)
    require_tensor("targets", targets)
    if hidden.dim() not in hidden_dims:
        raise ValueError(
            f"hidden must have {' or '.join(map(str, hidden_dims))} dimensions, "
            f"got shape {tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[0] == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with V >= 1 and hidden's H={hidden.shape[-1]}, got "
            f"{tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if bias is not None:
        require_float_tensor("bias", bias)
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V]=[{weight.shape[0]}], got {tuple(bias.shape)}")
    optional = {"bias": bias} if bias is not None else {}
    require_same_device(hidden=hidden, weight=weight, targets=targets, **optional)
    return require_real_in("temperature", temperature, MIN_TEMPERATURE)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """log softmax((hidden @ weight.T + bias) / temperature)[targets], without [N, V] logits.

    hidden: [N, H] or [B, T, H] float; weight: [V, H] (the lm head), same dtype;
    targets: [N] or [B, T] integer in [0, V); bias: [V] or None.
    Returns float32 (float64 for float64 inputs) logprobs shaped like targets, and the
    entropy of each position's distribution when return_entropy. Differentiable w.r.t.
    hidden, weight and bias.
    """
    temperature = check_lm_head(hidden, weight, targets, bias, temperature, hidden_dims=(2, 3))
    return_entropy = require_bool("return_entropy", return_entropy)
    flat_targets = targets.reshape(-1).long()
    logprobs, entropy, _ = torch.ops.oar.token_logprobs(
        hidden.reshape(targets.numel(), hidden.shape[-1]).contiguous(),
        weight.contiguous(),
        flat_targets.contiguous(),
        bias,
        temperature,
        return_entropy,
    )
    logprobs = logprobs.reshape(targets.shape)
    return (logprobs, entropy.reshape(targets.shape)) if return_entropy else logprobs
