"""Bi-Level reshape speed: the paper-style numpy loop vs our torch, C++ and Triton paths.

pytest bench/ --benchmark-only
"""

import pytest
import torch

from oar_kernels import _extension, reshape
from tests.helpers import paper_numpy_weights, random_ragged_scores, synchronized

SHAPES = [(b, t) for b in (8, 64, 256) for t in (512, 2048, 8192)]
PARAMS = dict(tau=0.25, beta=1.0, floor=0.1, preserve_mass=True)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none available)")
needs_extension = pytest.mark.skipif(not _extension.LOADED, reason=_extension.STATUS)
needs_triton = pytest.mark.skipif(reshape.triton is None, reason="triton is not installed")

IMPLS = [
    pytest.param("numpy-loop", "cpu", id="numpy-loop"),
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("cpp", "cpu", id="cpp-cpu", marks=needs_extension),
    pytest.param("torch", "cuda", id="torch-cuda", marks=needs_cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[needs_cuda, needs_triton]),
]


def _call(impl, scores, mask):
    if impl == "numpy-loop":
        s, m = scores.numpy(), mask.numpy()
        return lambda: paper_numpy_weights(s, m, **PARAMS)
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    args = (scores, mask, *PARAMS.values())
    if impl == "torch":
        return lambda: reshape._bilevel_weights_torch(*args, out=out)
    if impl == "triton":
        return lambda: reshape._bilevel_weights_triton(*args, out=out)
    return lambda: torch.ops.oar.bilevel_weights_into(*args, out)


@pytest.mark.parametrize("impl, device", IMPLS)
@pytest.mark.parametrize("batch, length", SHAPES, ids=[f"B{b}-T{t}" for b, t in SHAPES])
def test_reshape(benchmark, impl, device, batch, length):
    scores, mask = random_ragged_scores(batch, length, density=0.9, kind="lognormal", seed=0)
    scores, mask = scores.to(device), mask.to(device)
    benchmark.group = f"reshape B={batch} T={length}"
    benchmark.extra_info.update(impl=f"{impl}-{device}", baseline=impl == "numpy-loop")
    fn = synchronized(_call(impl, scores, mask), device)
    fn()  # warm-up: Triton compiles on first launch
    benchmark(fn)


@pytest.fixture
def busy_core():
    """Another process spinning on one core for the benchmark's duration, as a data loader or
    a second job would: the CPU path must not wait for a helper thread that cannot run."""
    import subprocess
    import sys

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    spinner.kill()
    spinner.wait()


@pytest.mark.parametrize("impl", ["numpy-loop", pytest.param("cpp", marks=needs_extension)])
def test_reshape_with_a_busy_core(benchmark, busy_core, impl):
    scores, mask = random_ragged_scores(256, 2048, density=0.9, kind="lognormal", seed=0)
    benchmark.group = "reshape B=256 T=2048, one core busy"
    benchmark.extra_info.update(impl=f"{impl}-cpu", baseline=impl == "numpy-loop")
    benchmark(_call(impl, scores, mask))
