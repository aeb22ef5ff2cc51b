"""OAR-G benchmarks.

1. The batched one-pass `gradient_importance` vs the paper's per-sequence loop (clean forward,
   noisy forward, `.backward()` on the model, gradient x input, one rollout at a time), and
   `oar_advantages` vs the plain old-logprob forward, on a 4-layer model.
2. `oar_advantages` at a realistic shape, in plain-forward equivalents (the forward a GRPO
   step runs anyway for its old logprobs is the baseline; "speedup" 0.5x = 2 forwards), with
   and without the model's gradient checkpointing. Also reported: the peak memory a call adds
   (fresh interpreter) and the aten ops and host reads it dispatches.

    pytest bench/test_bench_importance.py --benchmark-disable   # CI: the 2-layer cut only
    pytest bench/test_bench_importance.py --benchmark-only      # + Qwen2.5-0.5B's shape

The realistic model is Qwen2.5-0.5B's architecture built from its config with random weights
(no downloads): 24 layers, hidden 896, MLP 4864, 14 query / 2 KV heads, vocabulary 151936,
tied embeddings. Rows: a 64-token prompt, reasoning (all scored), an 8-token answer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import oar_kernels as ok
from oar_kernels.importance.causal_lm import clean_sequence_logprobs
from tests.helpers import peak_bytes_in_subprocess, synchronized

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The lm head outweighs the 4 layers here, as in small real models (Qwen2-0.5B: 136M of 494M).
LENGTH, VOCAB = 256, 32000
# B=32's paper loop costs a CPU about 2 minutes: CPUs run B=8 (CI: without a warm-up call).
BATCHES = [8, 32] if DEVICE == "cuda" else [8]


def bench_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=LENGTH,
    )
    return LlamaForCausalLM(config).to(DEVICE).eval()


def bench_batch(rows):
    """Right-padded rollouts: a 64-token prompt, a reasoning span, a 4-token answer."""
    gen = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, VOCAB, (rows, LENGTH), generator=gen)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (rows,), generator=gen)
    cols = torch.arange(LENGTH)
    attn = cols < lengths[:, None]
    answer = attn & (cols >= lengths[:, None] - 4)
    score = attn & (cols >= 64) & ~answer
    return [t.to(DEVICE) for t in (ids, attn, score, answer)]


def paper_loop(model, ids, attn, score, answer):
    """One rollout at a time, full logits, `.backward()` on the model (as the paper's code)."""
    scores = torch.zeros(ids.shape, device=ids.device)
    embed = model.get_input_embeddings()
    for r in range(ids.shape[0]):
        n = int(attn[r].sum())
        row = ids[r, :n][None]
        positions = answer[r, :n].nonzero().flatten()

        def phi(embeds):
            logp = torch.log_softmax(model(inputs_embeds=embeds).logits[0], -1)
            return logp[positions - 1, row[0, positions]].mean()

        e = embed(row).detach().requires_grad_()
        with torch.no_grad():
            clean = phi(e)
        noisy = e + 1e-3 * torch.randn_like(e) * score[r, :n, None]
        (clean - phi(noisy)).backward()
        scores[r, :n] = (e.grad[0] * e[0].detach()).sum(-1).abs() * score[r, :n]
        model.zero_grad(set_to_none=True)
    return scores


def plain_forward(model, ids, attn, score, answer):
    """The old-logprob forward of a GRPO step as trainers write it: full logits, log_softmax."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn.long()).logits
        return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])


IMPLS = {
    "paper-loop": paper_loop,
    "batched": lambda m, *b: ok.gradient_importance(m, *b, generator=torch.Generator(DEVICE)),
    "oar_advantages": lambda m, *b: ok.oar_advantages(
        m, *b, torch.ones(b[0].shape[0], device=DEVICE)
    ),
    "plain-forward": plain_forward,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("rows", BATCHES, ids=[f"B{b}" for b in BATCHES])
def test_gradient_importance(benchmark, impl, rows):
    model = bench_model()
    batch = bench_batch(rows)
    benchmark.group = f"OAR-G B={rows} T={LENGTH}"
    benchmark.extra_info.update(impl=impl, baseline=impl == "paper-loop")
    fn = synchronized(lambda: IMPLS[impl](model, *batch), DEVICE)
    if not benchmark.disabled:
        fn()
    benchmark.pedantic(fn, rounds=3, warmup_rounds=0)


# ------------------------------------------------------------------ the realistic shape

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
PROMPT, ANSWER = 64, 8


@dataclass(frozen=True)
class Shape:
    name: str
    device: str
    dtype: str  # torch dtype name
    rows: int
    length: int
    rounds: int
    layers: int = QWEN25_05B["num_hidden_layers"]
    vocab: int = QWEN25_05B["vocab_size"]
    full: bool = True  # only with --benchmark-only (CI runs the cut)


SHAPES = [
    Shape("ci-2layer-B2-T128", "cpu", "float32", 2, 128, 3, layers=2, vocab=8192, full=False),
    # The CPU shape (the GPU's when there is one); bfloat16 as users train it, and
    # CPUs with AVX512-BF16 run its GEMMs 3x faster than float32.
    Shape("qwen2.5-0.5b-B2-T256", DEVICE, "bfloat16", 2, 256, 1 if DEVICE == "cpu" else 5),
    Shape("qwen2.5-0.5b-B16-T1024", "cuda", "bfloat16", 16, 1024, 5),
]


@functools.lru_cache(maxsize=1)
def realistic_model(shape: Shape):
    """Qwen2.5-0.5B's config (cut to shape.layers / shape.vocab) with random weights, built in
    shape.dtype. Drawing 494M normals (transformers' init, module by module) takes minutes on
    a shared CPU; timing needs no independent weights, so each matrix repeats one block of
    2^22 N(0, 0.02) draws (from a seeded offset) and norms are 1."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.initialization import no_init_weights

    config = Qwen2Config(
        **{**QWEN25_05B, "num_hidden_layers": shape.layers, "vocab_size": shape.vocab}
    )
    dtype, default = getattr(torch, shape.dtype), torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(shape.device), no_init_weights():
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.tie_weights()
    gen = torch.Generator(shape.device).manual_seed(0)
    block = torch.randn(2**22, generator=gen, device=shape.device).mul_(0.02).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            flat = param.view(-1)
            if param.dim() == 1:
                flat.fill_(1.0)
                continue
            offset = int(torch.randint(len(block), (), generator=gen, device=shape.device))
            source = block.roll(-offset)
            for start in range(0, flat.numel(), len(block)):
                piece = flat[start : start + len(block)]
                piece.copy_(source[: piece.numel()])
    return model.eval()


def realistic_batch(shape: Shape):
    """[B, T] ids and masks, right-padded rows of T/2..T tokens: a prompt, reasoning (all
    scored), an answer."""
    gen = torch.Generator().manual_seed(shape.rows * shape.length)
    ids = torch.randint(1, shape.vocab, (shape.rows, shape.length), generator=gen)
    lengths = torch.linspace(shape.length // 2, shape.length, shape.rows).long()
    cols = torch.arange(shape.length)
    attention = cols < lengths[:, None]
    answer = attention & (cols >= lengths[:, None] - ANSWER)
    score = attention & (cols >= PROMPT) & ~answer
    return [t.to(shape.device) for t in (ids, attention, score, answer)]


def forward_token_logprobs(model, ids, attn, score, answer):
    """The same old logprobs without [B, T, V] logits: the decoder, then token_logprobs."""
    return clean_sequence_logprobs(model, ids, attn)


@contextlib.contextmanager
def gradient_checkpointing(model, enabled: bool):
    """The model's own activation checkpointing on for the block (transformers 5 renamed
    gradient_checkpointing_enable, now a deprecated alias)."""
    if not enabled:
        yield
        return
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    try:
        yield
    finally:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()


def oar_advantages(model, ids, attn, score, answer):
    return ok.oar_advantages(
        model, ids, attn, score, answer, torch.ones(ids.shape[0]).to(ids.device)
    )


REALISTIC = {
    # name: (function, the model's gradient checkpointing on)
    "plain-forward": (plain_forward, False),
    "forward+token_logprobs": (forward_token_logprobs, False),
    "oar_advantages": (oar_advantages, False),
    "oar_advantages-checkpointed": (oar_advantages, True),
}


class Dispatched(TorchDispatchMode):
    """Counts the aten ops dispatched, those that compute (views launch no kernel), and those
    that read values back to the host."""

    READS = ("_local_scalar_dense", "nonzero", "masked_select")

    def __init__(self):
        super().__init__()
        self.ops = self.kernels = self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not (func.is_view or func is torch.ops.aten._unsafe_view.default)
        self.host_reads += func.__name__.split(".")[0] in self.READS
        return func(*args, **(kwargs or {}))


def dispatches_of(fn) -> dict:
    """ops, kernels and host reads of one call of fn (Tensor.tolist counts as a read: on a
    CPU tensor it reads without dispatching)."""
    tolist, reads = torch.Tensor.tolist, []
    torch.Tensor.tolist = lambda self: reads.append(1) or tolist(self)
    try:
        with Dispatched() as seen:
            fn()
    finally:
        torch.Tensor.tolist = tolist
    return {"ops": seen.ops, "kernels": seen.kernels, "host_reads": seen.host_reads + len(reads)}


def run_realistic(impl: str, shape: Shape):
    """One call of `impl` on the cached model and batch; returns what the call returns."""
    model, batch = realistic_model(shape), realistic_batch(shape)
    fn, checkpointed = REALISTIC[impl]
    with gradient_checkpointing(model, checkpointed):
        return fn(model, *batch)


def peak_and_dispatches(impl: str, shape: Shape) -> dict:
    """One call's dispatches (counting costs microseconds an op) and the peak memory it adds:
    the CUDA allocator's, or on a CPU the resident set's in a fresh interpreter."""
    call = functools.partial(run_realistic, impl, shape)
    if shape.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        counts = dispatches_of(call)
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, **counts}
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        setup = f"""
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_bench_importance import SHAPES, dispatches_of, run_realistic, realistic_model
shape = next(s for s in SHAPES if s.name == {shape.name!r})
realistic_model(shape)
"""
        run = f"""counts = dispatches_of(lambda: run_realistic({impl!r}, shape))
with open({out.name!r}, "w") as out:
    json.dump(counts, out)"""
        peak = peak_bytes_in_subprocess(setup, run, shape.device)
        return {"peak_mb": peak / 2**20, **json.load(out)}


@pytest.mark.parametrize("impl", list(REALISTIC))
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_oar_advantages_realistic(benchmark, impl, shape):
    if shape.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if shape.full and benchmark.disabled:
        pytest.skip("the full shape runs with --benchmark-only")
    if impl == "forward+token_logprobs" and shape.full and shape.device == "cpu":
        pytest.skip("as long as plain-forward on a CPU; the CI cut shows both")
    benchmark.group = f"OAR-G {shape.name} ({shape.dtype})"
    benchmark.extra_info.update(impl=impl, baseline=impl == "plain-forward", shape=shape.name)
    if not benchmark.disabled:
        benchmark.extra_info.update(peak_and_dispatches(impl, shape))
    fn = synchronized(lambda: run_realistic(impl, shape), shape.device)
    if shape.device == "cuda":
        fn()  # CUDA: the first call pays cuBLAS/Triton set-up; a CPU call of seconds does not
    benchmark.pedantic(fn, rounds=shape.rounds, warmup_rounds=0)
