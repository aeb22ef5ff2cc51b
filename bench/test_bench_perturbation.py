"""OAR-P at realistic shapes: ours (shared prefixes, every row's counterfactuals packed into
micro-batches) against naive batched masking (the paper's: every masked copy of a row as a
full sequence, full [R, T, V] logits) and a per-row loop (ours, one row per call).

Reported per implementation: wall time (pytest-benchmark), token forwards, and from one more
call in a fresh interpreter the peak memory it adds, the aten ops it dispatches (all, and
those that compute: views run no kernel) and its host reads (GPU syncs).

    pytest bench/test_bench_perturbation.py --benchmark-disable   # CI: 2-layer cut, seconds
    pytest bench/test_bench_perturbation.py --benchmark-only      # + the Qwen2.5-0.5B shapes

The model is Qwen2.5-0.5B's architecture built from its config with random weights (no
downloads): 24 layers, hidden 896, MLP 4864, 14 query / 2 KV heads, vocabulary 151936, tied
embeddings. Rows are a prompt, `scored` reasoning tokens (all scored), an answer; mode `last`.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import oar_kernels as ok
from tests.helpers import peak_bytes_in_subprocess, synchronized

MASK_ID = 0
QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)


@dataclass(frozen=True)
class Shape:
    name: str
    device: str
    dtype: str  # torch dtype name
    rows: int
    length: int
    scored: int  # reasoning tokens per row, all scored; the prompt fills the rest
    answer: int
    naive_batch: int  # masked copies per naive forward (its [copies, T, V] logits bound memory)
    rounds: int
    layers: int = QWEN25_05B["num_hidden_layers"]
    vocab: int = QWEN25_05B["vocab_size"]
    full: bool = True  # needs --benchmark-only (CI runs only the cut)


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [
    # CI: the config cut to 2 layers and an 8192 vocabulary, float32.
    Shape("ci-2layer", DEVICE, "float32", 2, 48, 12, 4, 12, 3, layers=2, vocab=8192, full=False),
    # The CPU shape (on the GPU when there is one). bfloat16: CPUs with AVX512-BF16
    # run it 2x faster than float32, and naive masking costs ~3 s per counterfactual here.
    Shape("qwen2.5-0.5b-B2-T256", DEVICE, "bfloat16", 2, 256, 8, 8, 8, 3),
    Shape("qwen2.5-0.5b-B16-T1024", "cuda", "bfloat16", 16, 1024, 256, 8, 32, 3),
]


@functools.lru_cache(maxsize=1)
def bench_model(shape: Shape):
    """Random weights without transformers' per-module init (minutes at this size on a
    CPU): every matrix a slice of one N(0, 0.02) pool, norms 1."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.initialization import no_init_weights

    config = Qwen2Config(
        **{**QWEN25_05B, "num_hidden_layers": shape.layers, "vocab_size": shape.vocab}
    )
    with torch.device(shape.device), no_init_weights():
        model = Qwen2ForCausalLM(config)
    model.tie_weights()
    params = dict(model.named_parameters())
    gen = torch.Generator(shape.device).manual_seed(0)
    largest = max(p.numel() for p in params.values())
    pool = torch.randn(largest, generator=gen, device=shape.device) * 0.02
    with torch.no_grad():
        for param in params.values():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(pool[: param.numel()].view_as(param))
    return model.to(getattr(torch, shape.dtype)).eval()


def bench_batch(shape: Shape):
    """[B, T] ids and masks: a prompt, `scored` reasoning tokens, an answer; no padding."""
    gen = torch.Generator().manual_seed(shape.rows * shape.length)
    ids = torch.randint(1, shape.vocab, (shape.rows, shape.length), generator=gen)
    attention = torch.ones(shape.rows, shape.length, dtype=torch.bool)
    score = torch.zeros_like(attention)
    answer = torch.zeros_like(attention)
    prompt = shape.length - shape.scored - shape.answer
    score[:, prompt : prompt + shape.scored] = True
    answer[:, prompt + shape.scored :] = True
    return [t.to(shape.device) for t in (ids, attention, score, answer)]


def shared_prefix(model, batch, shape):
    scores, stats = ok.perturbation_importance(
        model, *batch, mode="last", mask_token_id=MASK_ID, return_stats=True
    )
    return scores, stats.token_forwards


def per_row(model, batch, shape):
    """Ours, one row per call (what the per-row loop of earlier versions did inside)."""
    tokens, scores = 0, []
    for row in range(batch[0].shape[0]):
        got, tokens_row = shared_prefix(model, [t[row : row + 1] for t in batch], shape)
        scores.append(got)
        tokens += tokens_row
    return torch.cat(scores), tokens


def naive_masking(model, batch, shape):
    """Per row: a clean forward, then every masked copy as a full sequence (shape.naive_batch
    copies per forward), full logits; KL at the logits predicting the first answer token."""
    ids, _, score, answer = batch
    scores = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    tokens = 0
    with torch.no_grad():
        for row in range(ids.shape[0]):
            at = int(answer[row].nonzero()[0]) - 1
            clean = torch.log_softmax(model(input_ids=ids[row : row + 1]).logits[0, at].float(), -1)
            positions = score[row].nonzero().flatten()
            for chunk in positions.split(shape.naive_batch):
                copies = ids[row].repeat(len(chunk), 1)
                copies[torch.arange(len(chunk)), chunk] = MASK_ID
                masked = torch.log_softmax(model(input_ids=copies).logits[:, at].float(), -1)
                scores[row, chunk] = (clean.exp() * (clean - masked)).sum(-1)
            tokens += (len(positions) + 1) * ids.shape[1]
    return scores, tokens


IMPLS = {"naive-masking": naive_masking, "per-row": per_row, "shared-prefix": shared_prefix}


# Ops that read a value, or a shape that depends on values, back to the host (a GPU sync).
HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}


class Dispatched(TorchDispatchMode):
    """Counts the aten ops dispatched, those that compute (views run no kernel), and host
    reads."""

    def __init__(self):
        super().__init__()
        self.ops = self.kernels = self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not (func.is_view or func is torch.ops.aten._unsafe_view.default)
        self.host_reads += func in HOST_READS
        return func(*args, **(kwargs or {}))


def measured_in_subprocess(impl: str, shape: Shape) -> dict:
    """Peak bytes the call adds, and its dispatched ops, in a fresh interpreter; a warm-up
    forward in the setup keeps one-time library initialisation out of the peak."""
    with tempfile.TemporaryDirectory() as tmp:
        counts = Path(tmp) / "counts.json"
        setup = f"""
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_bench_perturbation as bench
shape = bench.{shape!r}
model, batch = bench.bench_model(shape), bench.bench_batch(shape)
with torch.no_grad():
    model(input_ids=batch[0][:1, :8])
"""
        run = f"""
with bench.Dispatched() as counted:
    bench.IMPLS[{impl!r}](model, batch, shape)
open({str(counts)!r}, "w").write(json.dumps([counted.ops, counted.kernels, counted.host_reads]))
"""
        peak = peak_bytes_in_subprocess(setup, run, shape.device)
        ops, kernels, host_reads = json.loads(counts.read_text())
    return {"peak_mb": peak / 2**20, "aten_ops": ops, "kernels": kernels, "host_reads": host_reads}


NAIVE_SCORES: dict[str, torch.Tensor] = {}


def _check_against_naive(shape: Shape, impl: str, scores: torch.Tensor) -> None:
    """Every implementation gives naive masking's scores (naive runs first in each shape)."""
    if impl == "naive-masking":
        NAIVE_SCORES[shape.name] = scores
    elif shape.name in NAIVE_SCORES:
        tolerance = 1e-3 if shape.dtype == "float32" else 0.1  # bfloat16 rounding
        torch.testing.assert_close(scores, NAIVE_SCORES[shape.name], rtol=tolerance, atol=1e-5)


REPORT: list[str] = []


class _Summary:
    """Prints REPORT after pytest-benchmark's tables (a test's own output is captured)."""

    def pytest_terminal_summary(self, terminalreporter):
        if REPORT:
            terminalreporter.write_line("")
            terminalreporter.write_line(
                "OAR-P token forwards; aten ops, computing ops, host reads and peak memory (one "
                "more call, in a fresh interpreter)"
            )
            for line in REPORT:
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    plugins = request.config.pluginmanager
    if plugins.get_plugin("oar-p-bench-summary") is None:
        plugins.register(_Summary(), name="oar-p-bench-summary")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_perturbation_importance(benchmark, impl, shape):
    if shape.device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA device (none available)")
    if shape.full and benchmark.disabled:
        pytest.skip("the full shapes run with --benchmark-only")
    torch.manual_seed(0)
    model, batch = bench_model(shape), bench_batch(shape)
    benchmark.group = f"OAR-P {shape.name} R={shape.scored}/row"
    benchmark.extra_info.update(impl=impl, baseline=impl == "naive-masking", shape=shape.name)
    run = synchronized(lambda: IMPLS[impl](model, batch, shape), shape.device)
    started = time.perf_counter()
    # Naive masking runs once on the full shapes (~2 s per counterfactual on a CPU).
    rounds = 1 if benchmark.disabled or impl == "naive-masking" else shape.rounds
    scores, tokens = benchmark.pedantic(run, rounds=rounds)
    benchmark.extra_info["token_forwards"] = tokens
    _check_against_naive(shape, impl, scores)
    if not benchmark.disabled:
        benchmark.extra_info.update(measured_in_subprocess(impl, shape))
        info = benchmark.extra_info
        REPORT.append(
            f"{benchmark.group:<40} {impl:<14} {tokens:>9} tokens {info['aten_ops']:>8} ops "
            f"{info['kernels']:>8} computing {info['host_reads']:>5} reads "
            f"{info['peak_mb']:>9.1f} MB "
            f"({time.perf_counter() - started:.0f} s)"
        )
