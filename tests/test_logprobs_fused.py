"""The fused lm-head backend (OAR_KERNELS_LOGPROB_BACKEND=fused) against the float64
reference: under the Triton interpreter here, compiled on a GPU when there is one."""

import pytest
import torch

import oar_kernels as ok
from oar_kernels import logprobs
from oar_kernels.logprobs import token_logprobs_reference
from tests.helpers import NO_CUDA, assert_verbose_allclose, triton_device_or_skip
from tests.test_logprobs import _reference_with_grads as _reference  # the same float64 reference
from tests.test_logprobs import _run_ours as _ours  # the public call, backward included

CUDA = torch.cuda.is_available()
fused = pytest.importorskip("oar_kernels.logprobs_fused") if logprobs.triton else None
# (rtol, atol) against float64 per input dtype; bf16 inputs and bf16 chunk gradients.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (5e-2, 5e-2)}


@pytest.fixture
def device(monkeypatch):
    device = triton_device_or_skip(logprobs.triton)
    monkeypatch.setenv(logprobs.BACKEND_VARIABLE, "fused")
    return device


def _problem(rows, width, vocab, *, seed, device, dtype=torch.float32, bias=False, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen) * scale
    weight = torch.randn(vocab, width, generator=gen) / width**0.5
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    b = torch.randn(vocab, generator=gen) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), targets.to(device), cast(b)


def _compare(ours, ref, dtype, name):
    rtol, atol = TOLERANCE[dtype]
    for label, got, want in zip(("logprobs", "entropy"), ours[:2], ref[:2]):
        assert got.dtype == torch.float32
        assert_verbose_allclose(got.cpu(), want, rtol=rtol, atol=atol, name=f"{name} {label}")
    for label, got, want in zip(("d hidden", "d weight", "d bias"), ours[2], ref[2]):
        if want is not None:
            got = got.float().cpu()
            assert_verbose_allclose(got, want, rtol=rtol, atol=atol, name=f"{name} {label}")


CASES = {
    # rows, width, vocab, bias, temperature: tails of every tile, both backward walks.
    "ragged": (37, 24, 1000, True, 0.7),
    "one-row": (1, 16, 300, False, 1.3),
    "V<N-rows-walk": (70, 24, 30, True, 1.0),
    "prime-vocab": (5, 40, 32003, False, 1.0),
    "qwen-vocab": (3, 16, 151936, True, 0.9),
}


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_token_logprobs_fused_matches_reference(device, case, monkeypatch):
    rows, width, vocab, bias, temperature = CASES[case]
    # A small budget makes the backward walk several chunks (and a ragged last one).
    monkeypatch.setitem(logprobs.CHUNK_BYTES, device, 4 * 1024 * 40)
    hidden, weight, targets, b = _problem(rows, width, vocab, seed=rows, device=device, bias=bias)
    gen = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(2, rows, generator=gen).to(device)
    _compare(
        _ours(hidden, weight, targets, b, temperature, g_logp, g_ent),
        _reference(hidden, weight, targets, b, temperature, g_logp, g_ent),
        torch.float32,
        case,
    )


@pytest.fixture
def fused_calls(monkeypatch):
    """Names of the fused entry points called, in order (the op must not fall back)."""
    calls = []
    for name in ("fused_forward", "fused_backward"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    return calls


def test_fused_is_what_runs(device, fused_calls, monkeypatch):
    hidden, weight, targets, _ = _problem(4, 16, 50, seed=0, device=device)
    hidden.requires_grad_()
    ok.token_logprobs(hidden, weight, targets).sum().backward()
    assert fused_calls == ["fused_forward", "fused_backward"]
    monkeypatch.setenv(logprobs.BACKEND_VARIABLE, "chunked")
    ok.token_logprobs(hidden, weight, targets).sum().backward()
    assert len(fused_calls) == 2


def test_padding_rows_get_exact_zero_gradients(device):
    """Rows with no incoming gradient give 0 in d hidden even when their logits are NaN, and
    the entropy-only gradient path (no logprob gradient) works."""
    hidden, weight, targets, _ = _problem(6, 16, 200, seed=2, device=device)
    hidden[4] = float("nan")
    lp, ent, lse = fused.fused_forward(hidden, weight, targets, None, 1.0, True)
    assert lp[4].isnan() and lp[[0, 1, 2, 3, 5]].isfinite().all()
    g_logp = torch.tensor([1.0, 0.0, -1.0, 0.5, 0.0, 0.0], device=device)
    g_ent = torch.tensor([0.0, 0.7, 0.0, 0.0, 0.0, 0.3], device=device)
    out = torch.full((6, 200), float("nan"), device=device)  # poisoned: every cell is written
    fused._chunk_logits_grad(out, hidden, weight, None, targets, lse, ent, g_logp, g_ent, 1.0)
    assert torch.equal(out[4], torch.zeros(200, device=device))
    keep = [0, 1, 2, 3, 5]
    ref = _reference(hidden[keep], weight, targets[keep], None, 1.0, g_logp[keep], g_ent[keep])
    dh = out[keep] @ weight  # d hidden of the kept rows, from the written d logits
    assert_verbose_allclose(dh.cpu(), ref[2][0], rtol=2e-5, atol=2e-5, name="d hidden rows")


def test_poisoned_chunk_buffer_is_fully_written(device):
    hidden, weight, targets, bias = _problem(19, 24, 333, seed=3, device=device, bias=True)
    lp, ent, lse = fused.fused_forward(hidden, weight, targets, bias, 0.8, False)
    g = torch.linspace(-1, 1, 19, device=device)
    out = torch.full((19, 333), float("nan"), device=device)
    fused._chunk_logits_grad(out, hidden, weight, bias, targets, lse, None, g, None, 0.8)
    logits = (hidden.double() @ weight.double().T + bias.double()) / 0.8
    p = torch.softmax(logits, dim=-1)
    want = (torch.nn.functional.one_hot(targets, 333).double() - p) * g.double()[:, None] / 0.8
    assert_verbose_allclose(out.cpu(), want.cpu(), rtol=2e-5, atol=2e-6, name="d logits")


def test_masked_vocabulary_and_extreme_logits(device):
    """Logits of -inf (a masked vocabulary) and near float32's limit give finite results."""
    hidden, weight, targets, _ = _problem(8, 16, 300, seed=4, device=device)
    bias = torch.zeros(300, device=device)
    bias[100:] = float("-inf")
    targets = targets % 100
    lp, ent, _ = fused.fused_forward(hidden, weight, targets, bias, 1.0, True)
    ref_lp, ref_ent = token_logprobs_reference(
        hidden[:, :].cpu(), weight[:100].cpu(), targets.cpu()
    )
    assert_verbose_allclose(lp.cpu(), ref_lp, rtol=2e-5, atol=2e-5, name="masked logprobs")
    assert_verbose_allclose(ent.cpu(), ref_ent, rtol=2e-5, atol=2e-5, name="masked entropy")
    big = _problem(4, 16, 64, seed=5, device=device, scale=1e36)
    lp, ent, _ = fused.fused_forward(*big, 1.0, True)
    assert lp.isfinite().all() and ent.isfinite().all() and (lp <= 0).all()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("with_kl", [False, True], ids=["no-kl", "kl"])
def test_grpo_loss_fused_matches_chunked(device, loss_type, with_kl, fused_calls, monkeypatch):
    """grpo_loss on the fused kernels equals the chunked walk (itself tested against the
    float64 formula in test_loss.py), loss and gradients."""
    hidden, weight, targets, bias = _problem(24, 16, 500, seed=6, device=device, bias=True)
    gen = torch.Generator().manual_seed(7)
    shape = (4, 6)
    advantages = torch.randn(shape, generator=gen).to(device)
    mask = (torch.rand(shape, generator=gen) < 0.8).to(device)
    old = (torch.randn(shape, generator=gen) * 0.3 - 6).to(device)
    ref = (torch.randn(shape, generator=gen) * 0.3 - 6).to(device) if with_kl else None

    def run(backend):
        monkeypatch.setenv(logprobs.BACKEND_VARIABLE, backend)
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        out = ok.grpo_loss(
            leaves[0].reshape(*shape, -1),
            leaves[1],
            targets.reshape(shape),
            advantages,
            mask,
            old_logprobs=old,
            ref_logprobs=ref,
            bias=leaves[2],
            loss_type=loss_type,
            beta=0.04 if with_kl else 0.0,
            temperature=0.9,
        )
        out.loss.backward()
        return [out.loss, out.mean_kl, out.logprobs, *(t.grad for t in leaves)]

    got = run("fused")
    assert fused_calls == ["fused_forward", "fused_backward"]
    for name, got, want in zip(
        ("loss", "kl", "logprobs", "d hidden", "d weight", "d bias"), got, run("chunked")
    ):
        assert_verbose_allclose(got, want, rtol=2e-5, atol=2e-6, name=f"fused {name}")


def test_opcheck_and_compile_on_the_fused_backend(device, fused_calls):
    hidden, weight, targets, bias = _problem(9, 16, 70, seed=10, device=device, bias=True)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.library.opcheck(
        torch.ops.oar.token_logprobs.default, (hidden, weight, targets, bias, 0.9, True)
    )
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    def loss(h, w):
        lp, ent = ok.token_logprobs(h, w, targets, bias=bias, temperature=0.9, return_entropy=True)
        return -(lp.mean() + 0.01 * ent.mean())

    fused_calls.clear()
    compiled = loss(hidden, weight)
    grads = torch.autograd.grad(compiled, (hidden, weight))
    assert fused_calls == ["fused_forward", "fused_backward"]
    lp, ent = ok.token_logprobs(
        hidden, weight, targets, bias=bias, temperature=0.9, return_entropy=True
    )
    eager = -(lp.mean() + 0.01 * ent.mean())
    assert torch.allclose(compiled, eager)
    for got, want in zip(grads, torch.autograd.grad(eager, (hidden, weight))):
        assert torch.allclose(got, want, atol=1e-6)


def test_bad_backend_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(logprobs.BACKEND_VARIABLE, "fastest")
    hidden, weight, targets, _ = _problem(2, 8, 10, seed=0, device="cpu")
    with pytest.raises(ValueError, match=logprobs.BACKEND_VARIABLE):
        ok.token_logprobs(hidden, weight, targets)


cuda_only = pytest.mark.skipif(not CUDA, reason=NO_CUDA)


@cuda_only
@pytest.mark.parametrize("rows, width, vocab", [(4096, 4096, 151936), (1000, 896, 151936)])
def test_bf16_at_model_sizes(device, rows, width, vocab, monkeypatch):
    hidden, weight, targets, _ = _problem(
        rows, width, vocab, seed=8, device=device, dtype=torch.bfloat16
    )
    g_logp = torch.randn(rows, device=device)
    g_ent = torch.randn(rows, device=device) * 0.1
    # d hidden of a row depends on that row alone, so a slice of rows has a float64
    # reference that fits; d weight is compared with the chunked backend's.
    some = slice(0, 64)
    ref = _reference(hidden[some], weight, targets[some], None, 1.0, g_logp[some], g_ent[some])
    got = _ours(hidden, weight, targets, None, 1.0, g_logp, g_ent)
    rtol, atol = TOLERANCE[torch.bfloat16]
    for label, value, want in zip(
        ("logprobs", "entropy", "d hidden"), (*got[:2], got[2][0]), (*ref[:2], ref[2][0])
    ):
        value = value[some].float().cpu()
        assert_verbose_allclose(value, want, rtol=rtol, atol=atol, name=f"bf16 {label}")
    monkeypatch.setenv(logprobs.BACKEND_VARIABLE, "chunked")
    chunked = _ours(hidden, weight, targets, None, 1.0, g_logp, g_ent)
    error = (got[2][1].float() - chunked[2][1].float()).norm() / chunked[2][1].float().norm()
    assert error < 2e-2, f"bf16 d weight: fused vs chunked relative error {error:.3g}"


@cuda_only
def test_compile_fullgraph_on_gpu(device):
    hidden, weight, targets, bias = _problem(64, 64, 5000, seed=9, device=device, bias=True)
    hidden.requires_grad_()
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def loss(h):
        lp, ent = ok.token_logprobs(h, weight, targets, bias=bias, return_entropy=True)
        return -(lp.mean() + 0.01 * ent.mean())

    compiled = loss(hidden)
    (grad,) = torch.autograd.grad(compiled, hidden)
    lp, ent = ok.token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True)
    eager = -(lp.mean() + 0.01 * ent.mean())
    assert torch.allclose(compiled, eager)
    assert torch.allclose(grad, torch.autograd.grad(eager, hidden)[0], atol=1e-6)
