"""token_logprobs: every path against a float64 full-logits reference (SPEC sections 7-8)."""

import pytest
import torch

import oar_kernels as ok
from oar_kernels import logprobs
from oar_kernels.logprobs import token_logprobs_reference
from tests.helpers import (
    assert_verbose_allclose,
    check_bad_call,
    device_params,
    triton_device_or_skip,
)

CUDA = torch.cuda.is_available()
# (rtol, atol) of values and gradients against float64, per input dtype.
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float64: (1e-10, 1e-10),
}


def _problem(rows, hidden_size, vocab, dtype, seed, device="cpu", bias=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    b = torch.randn(vocab, generator=gen) * 0.1 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), targets.to(device), cast(b)


def _reference_with_grads(hidden, weight, targets, bias, temperature, w_logp, w_ent):
    leaves = [t.detach().double().cpu().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().double().cpu().requires_grad_()
    lp, ent = token_logprobs_reference(*leaves, targets.cpu(), bias=b, temperature=temperature)
    (lp * w_logp.double().cpu() + ent * w_ent.double().cpu()).sum().backward()
    grads = [leaves[0].grad, leaves[1].grad, None if b is None else b.grad]
    return lp, ent, grads


def _run_ours(hidden, weight, targets, bias, temperature, w_logp, w_ent):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    lp, ent = ok.token_logprobs(
        *leaves, targets, bias=b, temperature=temperature, return_entropy=True
    )
    (lp * w_logp + ent * w_ent).sum().backward()
    return lp, ent, [leaves[0].grad, leaves[1].grad, None if b is None else b.grad]


def _compare(ours, ref, dtype, name):
    rtol, atol = TOLERANCE[dtype]
    for label, got, want in zip(("logprobs", "entropy"), ours[:2], ref[:2]):
        assert_verbose_allclose(got, want, rtol=rtol, atol=atol, name=f"{name} {label}")
    for label, got, want in zip(("d hidden", "d weight", "d bias"), ours[2], ref[2]):
        if want is not None:
            assert_verbose_allclose(got.float(), want, rtol=rtol, atol=atol, name=f"{name} {label}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("vocab", [97, 11], ids=["backward-by-vocab", "backward-by-rows"])
def test_values_and_gradients_match_reference(device, dtype, temperature, bias, vocab, monkeypatch):
    # A small chunk budget makes the driver walk several chunks and a ragged last one.
    monkeypatch.setitem(logprobs.CHUNK_BYTES, device, 4 * vocab * 5)
    monkeypatch.setattr(logprobs, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(logprobs, "MIN_CHUNK_COLS", 1)
    assert logprobs._chunk_rows(23, vocab, torch.device(device)) == 5
    assert len(logprobs.vocab_chunks(23, vocab, torch.device(device))) > 2
    hidden, weight, targets, b = _problem(23, 16, vocab, dtype, seed=1, device=device, bias=bias)
    gen = torch.Generator().manual_seed(2)
    w_logp, w_ent = (torch.randn(23, generator=gen).to(device) for _ in range(2))
    ours = _run_ours(hidden, weight, targets, b, temperature, w_logp, w_ent)
    ref = _reference_with_grads(hidden, weight, targets, b, temperature, w_logp, w_ent)
    _compare(ours, ref, dtype, f"{device}/{dtype}")
    assert ours[0].dtype == torch.float32 and ours[2][1].dtype == dtype


@pytest.mark.parametrize("vocab", [151936, 152064, 32003])
def test_large_and_prime_vocab(vocab):
    hidden, weight, targets, _ = _problem(5, 8, vocab, torch.float32, seed=vocab)
    w = torch.ones(5)
    _compare(
        _run_ours(hidden, weight, targets, None, 1.0, w, w),
        _reference_with_grads(hidden, weight, targets, None, 1.0, w, w),
        torch.float32,
        f"V={vocab}",
    )


@pytest.mark.parametrize("vocab", [97, 151936])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_triton_chunk_steps_match_reference(vocab, with_entropy, monkeypatch):
    device = triton_device_or_skip(logprobs.triton)
    # Backward over several vocabulary chunks (targets relative to each chunk's start).
    monkeypatch.setattr(logprobs, "MIN_CHUNK_COLS", 1)
    monkeypatch.setitem(logprobs.CHUNK_BYTES, device, 4 * 3 * (vocab // 3 + 1))
    hidden, weight, targets, bias = _problem(
        3, 8, vocab, torch.float32, seed=4, device=device, bias=True
    )
    temperature = 0.8
    lp, ent, lse = logprobs.chunked_forward(
        hidden, weight, targets, bias, temperature, with_entropy, logprobs._fold_triton
    )
    ref_lp, ref_ent = token_logprobs_reference(
        hidden.cpu(), weight.cpu(), targets.cpu(), bias=bias.cpu(), temperature=temperature
    )
    assert_verbose_allclose(lp, ref_lp, rtol=1e-5, atol=1e-5, name="triton logprobs")
    if with_entropy:
        assert_verbose_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5, name="triton entropy")
    g_lp = torch.linspace(-1, 1, 3, device=device)
    g_ent = torch.linspace(0.5, -0.5, 3, device=device) if with_entropy else g_lp.new_empty(0)
    got = logprobs.chunked_backward(
        g_lp,
        g_ent,
        hidden,
        weight,
        targets,
        bias,
        lse,
        ent,
        temperature,
        logits_grad=logprobs._logits_grad_triton,
    )
    want = logprobs.chunked_backward(
        g_lp,
        g_ent,
        hidden,
        weight,
        targets,
        bias,
        lse,
        ent,
        temperature,
        logits_grad=logprobs._logits_grad_torch,
    )
    for name, a, b in zip(("d hidden", "d weight", "d bias"), got, want):
        assert_verbose_allclose(a, b, rtol=1e-5, atol=1e-6, name=f"triton {name}")


def test_gradcheck_float64():
    hidden, weight, targets, bias = _problem(6, 5, 11, torch.float64, seed=3, bias=True)
    for t in (hidden, weight, bias):
        t.requires_grad_()

    def both(h, w, b):
        return ok.token_logprobs(h, w, targets, bias=b, temperature=0.6, return_entropy=True)

    assert torch.autograd.gradcheck(both, (hidden, weight, bias))


def test_batched_shape_and_no_entropy():
    hidden, weight, targets, _ = _problem(12, 8, 40, torch.float32, seed=5)
    flat = ok.token_logprobs(hidden, weight, targets)
    batched = ok.token_logprobs(hidden.reshape(3, 4, 8), weight, targets.reshape(3, 4))
    assert batched.shape == (3, 4) and torch.equal(batched.reshape(-1), flat)
    assert ok.token_logprobs(hidden[:0], weight, targets[:0]).shape == (0,)


def test_opcheck_and_compile():
    hidden, weight, targets, bias = _problem(9, 8, 33, torch.float32, seed=6, bias=True)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.library.opcheck(
        torch.ops.oar.token_logprobs.default, (hidden, weight, targets, bias, 0.9, True)
    )
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(h, w):
        lp, ent = ok.token_logprobs(h, w, targets, bias=bias, temperature=0.9, return_entropy=True)
        return -(lp.mean() + 0.01 * ent.mean())

    compiled = loss(hidden, weight)
    grads = torch.autograd.grad(compiled, (hidden, weight))
    lp, ent = ok.token_logprobs(
        hidden, weight, targets, bias=bias, temperature=0.9, return_entropy=True
    )
    eager = -(lp.mean() + 0.01 * ent.mean())
    assert torch.allclose(compiled, eager)
    for got, want in zip(grads, torch.autograd.grad(eager, (hidden, weight))):
        assert torch.allclose(got, want, atol=1e-6)


def _bad_calls():
    h, w, t, _ = _problem(4, 8, 10, torch.float32, seed=0)
    return [
        ("hidden-int", lambda: ok.token_logprobs(h.long(), w, t), TypeError, "hidden"),
        ("weight-1d", lambda: ok.token_logprobs(h, w[0], t), ValueError, "weight"),
        ("h-mismatch", lambda: ok.token_logprobs(h[:, :4], w, t), ValueError, "hidden.s H"),
        ("dtype-mix", lambda: ok.token_logprobs(h.double(), w, t), TypeError, "share a dtype"),
        ("targets-float", lambda: ok.token_logprobs(h, w, t.float()), TypeError, "targets"),
        ("targets-shape", lambda: ok.token_logprobs(h, w, t[:3]), ValueError, "targets"),
        ("targets-range", lambda: ok.token_logprobs(h, w, t + 10), ValueError, r"\[0, 10\)"),
        ("targets-neg", lambda: ok.token_logprobs(h, w, t - 20), ValueError, r"\[0, 10\)"),
        ("bias-shape", lambda: ok.token_logprobs(h, w, t, bias=torch.zeros(3)), ValueError, "bias"),
        (
            "temp-zero",
            lambda: ok.token_logprobs(h, w, t, temperature=0.0),
            ValueError,
            "temperature",
        ),
        ("device", lambda: ok.token_logprobs(h, w.to("meta"), t), ValueError, "one device"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    check_bad_call(case)
