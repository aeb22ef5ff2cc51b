"""The peer shoot-out: token logprobs (fwd, fwd+bwd) and the GRPO loss (fwd+bwd) from hidden
states and the lm head, ours against full logits (eager and torch.compile), TRL's chunked
function, Liger-Kernel and cut-cross-entropy, on the same inputs in one process, beside the
GEMMs any of them must run (the floor). Every row's values are checked against the
full-logits float32 result before it is timed: a peer that is installed and disagrees fails.

    bash bench/peers.sh download && bash bench/peers.sh install   # the peers, --no-deps
    pytest bench/test_bench_peers.py --benchmark-only

Rows whose peer is missing, or runs on CUDA only, skip and say why.
"""

import functools
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
from test_bench_logprobs import _loss_batch, full_logits, trl_chunked

import oar_kernels as ok
from oar_kernels.logprobs import BACKEND_VARIABLE, uses_fused
from tests.helpers import assert_verbose_allclose, peak_bytes_in_subprocess, synchronized

# With --benchmark-disable (CI) the checked call is the test: nothing is timed.
pytestmark = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# Qwen2.5-7B-like and Qwen2-7B-like lm heads on CUDA; scaled down for a 2-core CPU.
SHAPES = (
    [(16384, 4096, 151936), (8192, 3584, 152064)]
    if CUDA
    else [(512, 256, 32000), (256, 256, 151936)]
)
SHAPE_IDS = [f"N{n}-H{h}-V{v}" for n, h, v in SHAPES]
# (rtol, atol) against the float32 full-logits result, per input dtype (as tests/ use).
LOGPROB_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 5e-2)}
LOSS_TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (5e-2, 5e-3)}
CCE_IMPL = "cce" if CUDA else "torch_compile"  # cut-cross-entropy's own kernels need CUDA
FLOOR = "gemm-floor"
BASELINES = ("full-logits", "loss-unfused")


def liger_flce(hidden, weight, targets):
    """Liger's fused linear cross entropy, per token: its loss is -logprob."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return -liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")


def cut_ce(hidden, weight, targets):
    """cut-cross-entropy's linear_cross_entropy, per token (its default gradient filter)."""
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, targets, reduction="none", impl=CCE_IMPL)


def gemm_floor(hidden, weight, backward):
    """The GEMMs every row runs: logits = h @ W.T; a backward adds dlogits @ W and
    dlogits.T @ h, the same FLOPs twice more (logits stand in for dlogits)."""
    logits = torch.mm(hidden, weight.T)
    if backward:
        torch.mm(logits, weight)
        torch.mm(logits.T, hidden)


def _grpo_batch(hidden, targets):
    """The logprob bench's GRPO batch with one advantage per sequence: [B], what Liger takes."""
    hidden, targets, advantages, mask, old = _loss_batch(hidden, targets)
    return hidden, targets, advantages[:, 0].contiguous(), mask, old


def loss_unfused(hidden, weight, targets):
    """TRL's formula on full logits: clipped surrogate (eps 0.2), mean per sequence, mean."""
    hidden, targets, advantages, mask, old = _grpo_batch(hidden, targets)
    logps = full_logits(hidden.flatten(0, 1), weight, targets.flatten()).view_as(old)
    ratio, adv = torch.exp(logps - old), advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    per_sequence = (surrogate * mask).sum(1) / mask.sum(1).clamp(min=1)
    return -per_sequence.mean()


def loss_oar(hidden, weight, targets):
    hidden, targets, advantages, mask, old = _grpo_batch(hidden, targets)
    return ok.grpo_loss(hidden, weight, targets, advantages, mask, old_logprobs=old).loss


@functools.cache
def _liger_grpo():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # Its defaults (compiled chunks) but no KL, no reference model, and TRL's "grpo"
    # aggregation, as ours.
    return LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo")


def loss_liger(hidden, weight, targets):
    hidden, targets, advantages, mask, old = _grpo_batch(hidden, targets)
    loss, _metrics = _liger_grpo()(
        hidden, weight, targets, mask.long(), advantages, old_per_token_logps=old
    )
    return loss


LOGPROBS = {
    "full-logits": full_logits,
    "full-logits-compile": torch.compile(full_logits, dynamic=False),
    "trl-chunked": trl_chunked,
    "liger-flce": liger_flce,
    "cce": cut_ce,
    "oar-chunked": ok.token_logprobs,
    "oar-fused": ok.token_logprobs,  # under FUSED
}
LOSSES = {
    "loss-unfused": loss_unfused,
    "loss-oar": loss_oar,
    "loss-oar-fused": loss_oar,  # under FUSED
    "loss-liger": loss_liger,
}
IMPLS = {**LOGPROBS, **LOSSES}
# Our lm-head ops read the backend at each call; "fused" is the one-pass Triton kernel (CUDA).
FUSED = {BACKEND_VARIABLE: "fused"}
ENV = {"oar-fused": FUSED, "loss-oar-fused": FUSED}
LABELS = {"cce": "cce" if CUDA else "cce-torch-compile"}
COMPILED = {"full-logits-compile", "loss-liger", *([] if CUDA else ["cce"])}
PEERS = {
    "trl-chunked": ("trl", "trl.kernels"),
    "liger-flce": ("liger-kernel", "liger_kernel.transformers.functional"),
    "cce": ("cut-cross-entropy", "cut_cross_entropy"),
    "loss-liger": ("liger-kernel", "liger_kernel.chunked_loss"),
}
CUDA_ONLY = {
    "liger-flce": "Liger's fused linear cross entropy launches Triton kernels: CUDA only",
    "oar-fused": "the fused Triton backend runs on CUDA only",
    "loss-oar-fused": "the fused Triton backend runs on CUDA only",
}


def _skip_reason(impl):
    """Why a row cannot run here (cheap: no peer is imported), or None."""
    if impl in PEERS and importlib.util.find_spec(PEERS[impl][1].split(".")[0]) is None:
        return f"{PEERS[impl][0]} is not installed (bash bench/peers.sh download, then install)"
    return None if CUDA else CUDA_ONLY.get(impl)


def _import_peer(impl):
    """Imports the row's peer; one installed that cannot import on this machine skips."""
    if impl in PEERS:
        package, module = PEERS[impl]
        try:
            importlib.import_module(module)
        except Exception as error:
            pytest.skip(f"{package} is installed but `import {module}` fails: {error!r}")


def _params(names):
    return [
        pytest.param(name, marks=pytest.mark.skipif(bool(why), reason=why or ""))
        for name in names
        for why in [_skip_reason(name)]
    ]


@functools.cache
def _base_inputs(rows, width, vocab):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(rows, width, device=DEVICE, dtype=DTYPE, generator=gen)
    weight = torch.randn(vocab, width, device=DEVICE, dtype=DTYPE, generator=gen) / width**0.5
    return hidden, weight, torch.randint(0, vocab, (rows,), device=DEVICE, generator=gen)


def _inputs(rows, width, vocab, backward):
    """hidden: [N, H], weight: [V, H] (DTYPE), targets: [N]; leaves when backward."""
    hidden, weight, targets = _base_inputs(rows, width, vocab)
    leaf = lambda t: t.detach().requires_grad_(backward)  # noqa: E731
    return leaf(hidden), leaf(weight), targets


@functools.cache
def _expected(kind, rows, width, vocab):
    """The full-logits result in float32 from the same inputs: logprobs [N] or the loss."""
    hidden, weight, targets = _base_inputs(rows, width, vocab)
    with torch.no_grad():
        return (full_logits if kind == "logprobs" else loss_unfused)(
            hidden.float(), weight.float(), targets
        )


def _step(impl, backward, hidden, weight, targets):
    """The timed call: it returns the row's values (the floor: None)."""
    if impl == FLOOR:
        return lambda: gemm_floor(hidden, weight, backward)
    fn = IMPLS[impl]

    def step():
        values = fn(hidden, weight, targets)
        if backward:
            torch.autograd.grad(values.sum(), (hidden, weight))
        return values

    return step


def _peak_mb(impl, backward, shape, step):
    """Memory a call adds. CUDA: the allocator's peak over a warm call, in this process
    (exact; a fresh CUDA process per row would eat the device's time). CPU: the resident set
    of a fresh process (tests.helpers) over its first call, or its second for the rows
    that compile, so that the compiler is not counted (a warm call would reuse the heap the
    first one left, and read lower than it needs)."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    setup = f"""
sys.path.insert(0, {str(Path(__file__).parent)!r})
os.environ.update({ENV.get(impl, {})!r})
from test_bench_peers import _inputs, _step
step = _step({impl!r}, {backward}, *_inputs(*{shape!r}, {backward}))
if {impl in COMPILED!r}:
    step()
"""
    return peak_bytes_in_subprocess(setup, "step()", DEVICE) / 2**20


def _check_and_time(benchmark, monkeypatch, impl, kind, backward, shape, group):
    monkeypatch.delenv(BACKEND_VARIABLE, raising=False)
    for name, value in ENV.get(impl, {}).items():
        monkeypatch.setenv(name, value)
    _import_peer(impl)
    if benchmark.disabled and impl == "full-logits-compile":
        pytest.skip("checks torch.compile, not a peer; its compiles are only worth it when timed")
    hidden, weight, targets = _inputs(*shape, backward)
    if impl.startswith(("oar", "loss-oar")):  # the row runs the backend it is named for
        assert uses_fused(hidden) == (impl in ENV), f"{impl}: {BACKEND_VARIABLE} not followed"
    step = synchronized(_step(impl, backward, hidden, weight, targets), DEVICE)
    values = step()  # compiles, autotunes; checked before anything is timed
    if impl != FLOOR:
        rtol, atol = (LOGPROB_TOLERANCE if kind == "logprobs" else LOSS_TOLERANCE)[DTYPE]
        got, want = values.detach().float(), _expected(kind, *shape)
        assert_verbose_allclose(got, want, rtol=rtol, atol=atol, name=impl)
    if benchmark.disabled:  # the checked call ran the step; CI has nothing to time
        return
    label = LABELS.get(impl, impl) if impl != FLOOR else FLOOR + ("-x3" if backward else "")
    benchmark.group = group
    benchmark.extra_info.update(impl=label, baseline=impl in BASELINES)
    # A CPU process per forward row would double the CPU run: those rows have no peak there.
    if CUDA or backward:
        benchmark.extra_info["peak_mb"] = _peak_mb(impl, backward, shape, step)
    benchmark.pedantic(step, rounds=3, warmup_rounds=0)


@pytest.mark.parametrize("impl", _params([*LOGPROBS, FLOOR]))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_token_logprobs(benchmark, monkeypatch, impl, backward, shape):
    group = f"peers {'fwd+bwd' if backward else 'fwd'} N={shape[0]} H={shape[1]} V={shape[2]}"
    _check_and_time(benchmark, monkeypatch, impl, "logprobs", backward, shape, group)


@pytest.mark.parametrize("impl", _params([*LOSSES, FLOOR]))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_grpo_loss(benchmark, monkeypatch, impl, shape):
    group = f"peers grpo loss N={shape[0]} H={shape[1]} V={shape[2]}"
    _check_and_time(benchmark, monkeypatch, impl, "loss", True, shape, group)
