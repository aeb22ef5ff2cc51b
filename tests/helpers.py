"""Helpers shared by tests/ and bench/ (imported as `tests.helpers`; pytest puts the
repository root on sys.path): random ragged batches, the paper's per-row numpy procedure,
tiny models, subprocess runners, a CUDA-synchronizing wrapper for timing, and an allclose
that says where it failed. Not part of the installed package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Subprocesses start here, so that `-c` code can import tests.helpers too.
REPO_ROOT = Path(__file__).resolve().parents[1]

SCORE_KINDS = ("lognormal", "uniform", "ties", "constant", "negative", "tiny")


def random_ragged_scores(
    batch: int, length: int, *, density: float, kind: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random importance scores [B, T] float32 and a ragged score_mask [B, T] bool.

    Each row's scored span is a random window (like a reasoning span inside a padded
    rollout) thinned to roughly `density`; `kind` picks the score distribution.
    """
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, length + 1, (batch, 1), generator=gen)
    ends = torch.randint(0, length + 1, (batch, 1), generator=gen)
    cols = torch.arange(length)
    window = (cols >= torch.minimum(starts, ends)) & (cols < torch.maximum(starts, ends))
    mask = window & (torch.rand(batch, length, generator=gen) < density)
    shape = (batch, length)
    if kind == "lognormal":
        scores = torch.exp(2 * torch.randn(shape, generator=gen))
    elif kind == "uniform":
        scores = torch.rand(shape, generator=gen)
    elif kind == "ties":
        scores = torch.randint(0, 4, shape, generator=gen).float() * 0.5
    elif kind == "constant":
        scores = torch.full(shape, 0.7)
    elif kind == "negative":
        scores = torch.randn(shape, generator=gen) - 0.5
    elif kind == "tiny":
        scores = torch.rand(shape, generator=gen) * 1e-6
    else:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    return scores, mask


def paper_numpy_weights(
    scores: np.ndarray, score_mask: np.ndarray, *, tau=0.25, beta=1.0, floor=0.1, preserve_mass=True
) -> np.ndarray:
    """The paper's procedure written the obvious way: numpy, one row at a time, float64."""
    weights = np.ones(scores.shape, dtype=np.float64)
    for b in range(scores.shape[0]):
        idx = np.flatnonzero(score_mask[b])
        if idx.size == 0:
            continue
        imp = np.log1p(np.maximum(scores[b, idx].astype(np.float64), 0.0))
        lo, hi = imp.min(), imp.max()
        norm = (imp - lo) / (hi - lo if hi - lo > 0 else 1.0)
        thr = np.quantile(norm, tau)
        w = np.where(
            norm < thr,
            np.maximum(norm / (thr + 1e-8), floor),
            1.0 + beta * (norm - thr) / (1.0 - thr + 1e-8),
        )
        if preserve_mass:
            w = w * idx.size / (w.sum() + 1e-8)
        weights[b, idx] = w
    return weights


NO_CUDA = "needs a CUDA device (none available)"


def device_params() -> list:
    """pytest parameters: "cpu", and "cuda" skipped with a reason where there is none."""
    import pytest

    return [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
        ),
    ]


def triton_device_or_skip(triton_module) -> str:
    """Device the Triton kernels run on in tests: CUDA, else the CPU under TRITON_INTERPRET=1."""
    import os

    import pytest

    if triton_module is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET was not set before triton loaded")
    return "cpu"


def check_bad_call(case) -> None:
    """Runs one row of a bad-input table, (id, call, exception type, message regex): the call
    must raise that exception with a message naming the argument."""
    import pytest

    _, call, error, message = case
    with pytest.raises(error, match=message):
        call()


def assert_python_passes(code: str, **env: str) -> None:
    """Runs `code` in a fresh interpreter with extra environment variables (for settings read
    at import or load time) and fails with its stderr if it does."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr


TINY_VOCAB, TINY_WIDTH = 61, 32


def tiny_causal_lm(kind: str, seed: int = 0, vocab_size: int = TINY_VOCAB):
    """A tiny random Llama or Qwen2 causal LM built from a config (no downloads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=TINY_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = (
        LlamaForCausalLM(LlamaConfig(**common))
        if kind == "llama"
        else Qwen2ForCausalLM(Qwen2Config(**common))
    )
    return model.eval()


def ragged_rollouts(seed: int, left_pad: bool, rows: int = 4, width: int = 12):
    """Rows of different lengths, a scored span anywhere in the completion, an answer span
    after it (one row without), and per-row noise for the real tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [width, width - 3, width - 5, width - 1][:rows]
    ids = torch.zeros(rows, width, dtype=torch.long)
    attn, score, answer = (torch.zeros(rows, width, dtype=torch.bool) for _ in range(3))
    noise = torch.zeros(rows, width, TINY_WIDTH, dtype=torch.float64)
    per_row = []
    for r, n in enumerate(lengths):
        row_ids = torch.randint(1, TINY_VOCAB, (n,), generator=gen)
        s, a = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        start = int(torch.randint(1, n - 4, (1,), generator=gen))
        s[start : n - 2] = True
        if r != 1:  # row 1 has no answer span: it falls back to `last`
            a[n - 2 :] = True
        row_noise = torch.randn(n, TINY_WIDTH, generator=gen, dtype=torch.float64) * 1e-3
        cols = slice(width - n, width) if left_pad else slice(0, n)
        ids[r, cols], attn[r, cols], score[r, cols], answer[r, cols] = row_ids, True, s, a
        noise[r, cols] = row_noise
        per_row.append((row_ids, s, a, row_noise, cols))
    return ids, attn, score, answer, noise, per_row


_PEAK_HARNESS = """
import json, os, sys, threading, time
import torch
{setup}
def run():
{run}
page = os.sysconf("SC_PAGE_SIZE")
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
if {device!r} == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated(); run(); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
else:
    # CPU has no allocator statistics: sample the resident set while the step runs.
    base, peak, done = resident(), 0, False
    def sample():
        global peak
        while not done:
            peak = max(peak, resident() - base)
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample); sampler.start()
    run(); done = True; sampler.join()
print(json.dumps(peak))
"""


def peak_bytes_in_subprocess(setup: str, run: str, device: str) -> int:
    """Memory that `run` adds on top of what `setup` built, measured in a fresh interpreter:
    the CUDA allocator's peak, or on CPU the resident set sampled every 0.5 ms."""
    import json
    import subprocess
    import sys
    import textwrap

    script = _PEAK_HARNESS.format(setup=setup, run=textwrap.indent(run, "    "), device=device)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def synchronized(fn, device: str):
    """Wraps `fn` so that CUDA work finishes inside the call (for benchmarks)."""
    if torch.device(device).type != "cuda":
        return fn

    def synced():
        result = fn()
        torch.cuda.synchronize()
        return result

    return synced


def assert_verbose_allclose(actual, expected, *, rtol: float, atol: float, name: str = "") -> None:
    """torch.testing-style allclose whose failure counts the mismatches and shows the worst."""
    actual = torch.as_tensor(actual).detach().cpu().double()
    expected = torch.as_tensor(expected).detach().cpu().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol)
    bad |= actual.isnan() != expected.isnan()
    if bad.any():
        where = bad.nonzero()
        err = (actual - expected).abs().nan_to_num(float("inf"))
        worst = tuple(int(i) for i in (err == err.max()).nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (rtol={rtol}, atol={atol}); "
            f"first at {tuple(where[0].tolist())}; worst at {worst}: "
            f"actual {actual[worst].item()!r} vs expected {expected[worst].item()!r}"
        )
