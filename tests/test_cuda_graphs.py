"""Every op captured in a CUDA graph replays what eager gives on new inputs (issue 12 item 6).

Capture needs ops that never read a value back to the host (tests/test_no_host_sync.py pins
that on CPU) and no first-call work under capture: each op is warmed up on a side stream
first (Triton compiles, cuBLAS sets up its workspace, one-time probes run), then captured
with static inputs; new values are copied into those inputs and the graph replayed.
"""

import pytest
import torch

import oar_kernels as ok
from oar_kernels import logprobs
from oar_kernels import loss as loss_module
from tests.helpers import assert_verbose_allclose

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROWS, WIDTH, VOCAB = 48, 32, 1000
TEMPERATURE = 0.8


@pytest.fixture(autouse=True)
def several_chunks(monkeypatch):
    """Budgets small enough that every walk takes several chunks, the last one ragged."""
    monkeypatch.setitem(logprobs.CHUNK_BYTES, "cuda", 4 * ROWS * 300)
    monkeypatch.setattr(logprobs, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(logprobs, "MIN_CHUNK_COLS", 1)


def _graphed(fn, static):
    """(graph, outputs) of fn(*static) captured after a warm-up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static)
    return graph, outputs


def _flat(outputs):
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def _check_replay(fn, make_inputs, *, tol=1e-5):
    """Capture on inputs of seed 0, replay on inputs of seed 1, compare with eager on them."""
    static = make_inputs(0)
    graph, outputs = _graphed(fn, static)
    fresh = make_inputs(1)
    for buffer, value in zip(static, fresh):
        buffer.copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    want = fn(*fresh)
    got, want = _flat(outputs), _flat(want)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert_verbose_allclose(a, b, rtol=tol, atol=tol, name=f"output {i}")


def _lm_head(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, WIDTH, generator=gen)
    weight = torch.randn(VOCAB, WIDTH, generator=gen) / WIDTH**0.5
    bias = torch.randn(VOCAB, generator=gen) * 0.1
    targets = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    floats = (t.to("cuda", dtype) for t in (hidden, weight, bias))
    return (*floats, targets.cuda())


def _per_token(seed):
    """Advantages, aggregation and metric weights, old and ref logprobs: [ROWS] float32."""
    gen = torch.Generator().manual_seed(100 + seed)
    advantages = torch.randn(ROWS, generator=gen)
    mask = (torch.rand(ROWS, generator=gen) < 0.8).float()
    old = torch.randn(ROWS, generator=gen) - 7.0
    return [t.cuda() for t in (advantages, mask / ROWS, mask / mask.sum(), old, old + 0.1)]


def test_token_logprobs():
    def fn(hidden, weight, bias, targets):
        return ok.token_logprobs(
            hidden, weight, targets, bias=bias, temperature=TEMPERATURE, return_entropy=True
        )

    _check_replay(fn, _lm_head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_backward(dtype):
    def make_inputs(seed):
        hidden, weight, bias, targets = _lm_head(seed, dtype)
        _, entropy, lse = torch.ops.oar.token_logprobs(
            hidden, weight, targets, bias, TEMPERATURE, True
        )
        gen = torch.Generator().manual_seed(200 + seed)
        grads = [torch.randn(ROWS, generator=gen).cuda() for _ in range(2)]
        return (*grads, hidden, weight, targets, bias, lse, entropy)

    def fn(*args):
        return torch.ops.oar.token_logprobs_backward(*args, TEMPERATURE)

    _check_replay(fn, make_inputs, tol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("walk", ["one", "two"])
def test_grpo_loss_with_its_gradients(walk, monkeypatch):
    monkeypatch.setattr(loss_module, "WALK", walk)

    def make_inputs(seed):
        hidden, weight, bias, targets = _lm_head(seed)
        return (hidden, weight, bias, targets, *_per_token(seed))

    def fn(hidden, weight, bias, targets, advantages, token_w, metric_w, old, ref):
        return torch.ops.oar.grpo_loss(
            hidden, weight, targets, advantages, token_w, metric_w, old, ref, bias,
            0.2, 0.28, 0.04, TEMPERATURE, True,
        )  # fmt: skip

    _check_replay(fn, make_inputs)


def test_grpo_loss_public_forward():
    def make_inputs(seed):
        hidden, weight, _, targets = _lm_head(seed)
        advantages, _, _, old, _ = _per_token(seed)
        mask = old > -7.0
        shape = (4, ROWS // 4)
        return (hidden.reshape(*shape, WIDTH), weight, targets.reshape(shape),
                advantages.reshape(shape), mask.reshape(shape), old.reshape(shape))  # fmt: skip

    def fn(hidden, weight, targets, advantages, mask, old):
        out = ok.grpo_loss(hidden, weight, targets, advantages, mask, old_logprobs=old)
        return (out.loss, out.clip_fraction, out.mean_ratio, out.logprobs)

    _check_replay(fn, make_inputs)


def _scores(seed):
    gen = torch.Generator().manual_seed(300 + seed)
    scores = torch.rand(6, 200, generator=gen) ** 3
    mask = torch.rand(6, 200, generator=gen) < 0.7
    advantages = torch.randn(6, generator=gen)
    return scores.cuda(), mask.cuda(), advantages.cuda()


def test_reshape_advantages_without_finite_checks():
    def fn(scores, mask, advantages):
        return ok.reshape_advantages(advantages, scores, mask, check_finite=False)

    _check_replay(fn, _scores)


def test_bilevel_weights_without_finite_checks():
    def fn(scores, mask, advantages):
        return ok.bilevel_weights(scores, mask, check_finite=False)

    _check_replay(fn, _scores)
