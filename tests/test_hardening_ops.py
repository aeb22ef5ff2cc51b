"""Adversarial inputs to the ops (issue 11): each test here failed before its fix.

Wrong numbers first (subnormal and beyond-float32 scores, NaN in padding, -inf logits,
double backward), then the ops' own argument checks, fake-kernel strides and empty sizes.
"""

import math

import pytest
import torch

import oar_kernels as ok
from oar_kernels import _extension, logprobs, reshape
from oar_kernels.logprobs import token_logprobs_reference
from oar_kernels.loss import LOSS_TYPES
from tests.helpers import assert_verbose_allclose, triton_device_or_skip

DEFAULTS = dict(tau=0.25, beta=1.0, floor=0.1, preserve_mass=True)


def _weights_by_path(path, scores, mask, **params):
    """One reshape backend on NaN-poisoned output, reached the way a raw-op caller would."""
    params = {**DEFAULTS, **params}
    args = (params["tau"], params["beta"], params["floor"], params["preserve_mass"])
    if path == "cpp":
        if not _extension.LOADED:
            pytest.skip(f"C++ extension not loaded: {_extension.STATUS}")
        out = torch.full(scores.shape, float("nan"))
        torch.ops.oar.bilevel_weights_into(scores, mask, *args, out)
        return out
    if path == "triton":
        device = triton_device_or_skip(reshape.triton)
        scores, mask = scores.to(device), mask.to(device)
        out = torch.full(scores.shape, float("nan"), device=device)
        reshape._bilevel_weights_triton(scores, mask, *args, out=out)
        return out.cpu()
    out = torch.full(scores.shape, float("nan"))
    reshape._bilevel_weights_torch(scores, mask, *args, out=out)
    return out


PATHS = ["cpp", "torch", "triton"]


def _extreme_scores():
    gen = torch.Generator().manual_seed(0)
    tiny = torch.rand(4, 1000, generator=gen, dtype=torch.float64)
    return {
        "f32-subnormal-pair": torch.tensor([[0.0, 1e-39]]),
        "f32-subnormal-rows": (tiny * 1e-39).float(),
        "f64-subnormal-rows": tiny * 1e-39,
        "f64-below-f32-subnormals": torch.tensor([[0.0, 1e-320, 3e-320]], dtype=torch.float64),
        "f64-beyond-f32-max": torch.tensor([[1e300, 1.0, 0.0]], dtype=torch.float64),
        "f64-huge-spread": torch.tensor([[1e-300, 1e300, 1e150, 7.0]], dtype=torch.float64),
        "f32-near-max": torch.tensor([[3.4e38, 3.3e38, 1.0, 0.0]]),
    }


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(_extreme_scores()))
def test_reshape_is_right_over_the_whole_finite_range(path, name):
    scores = _extreme_scores()[name]
    mask = torch.ones(scores.shape, dtype=torch.bool)
    expected = reshape.bilevel_weights_reference(scores, mask, **DEFAULTS)
    got = _weights_by_path(path, scores, mask)
    assert_verbose_allclose(got, expected, rtol=1e-4, atol=1e-5, name=f"{path} {name}")


def test_reshape_advantages_beyond_float32_is_an_error():
    scores = torch.rand(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="advantages"):
        ok.reshape_advantages(torch.tensor([1e39, 1.0], dtype=torch.float64), scores, mask)
    # Within range but overflowing once weighted (weights reach ~2): still an error, not inf.
    with pytest.raises(ValueError, match="advantages"):
        ok.reshape_advantages(torch.tensor([3e38, 1.0]), scores, mask)
    finite = ok.reshape_advantages(torch.tensor([1e30, -1e30], dtype=torch.float64), scores, mask)
    assert torch.isfinite(finite).all()


# ------------------------------------------------------------------------ the raw ops


def _bad_params():
    nan, inf = float("nan"), float("inf")
    return [
        ("tau", nan),
        ("tau", -5.0),
        ("tau", 2.0),
        ("tau", 1e30),
        ("beta", inf),
        ("beta", nan),
        ("beta", -1.0),
        ("beta", 1e30),
        ("floor", 5.0),
        ("floor", nan),
    ]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("param", _bad_params(), ids=lambda p: f"{p[0]}={p[1]}")
def test_every_reshape_kernel_checks_its_scalars(path, param):
    name, value = param
    scores, mask = torch.rand(2, 6), torch.ones(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=name):
        _weights_by_path(path, scores, mask, **{name: value})


@pytest.mark.parametrize("path", PATHS)
def test_every_reshape_kernel_reads_integer_masks_as_masks(path):
    scores = torch.rand(3, 10, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(2)) < 0.6
    expected = reshape.bilevel_weights_reference(scores, mask, **DEFAULTS)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        got = _weights_by_path(path, scores, mask.to(dtype))
        assert_verbose_allclose(got, expected, rtol=1e-4, atol=1e-5, name=f"{path} {dtype}")


@pytest.mark.parametrize("path", PATHS)
def test_every_reshape_kernel_refuses_a_float_mask(path):
    with pytest.raises(TypeError, match="score_mask"):
        _weights_by_path(path, torch.rand(2, 3), torch.ones(2, 3))


def test_compiled_reshape_of_a_transposed_input_matches_eager():
    torch._dynamo.reset()
    scores, mask = torch.rand(9, 3).t(), torch.ones(3, 9, dtype=torch.bool)
    compiled = torch.compile(lambda s, m: ok.bilevel_weights(s, m).view(-1), fullgraph=True)
    assert torch.equal(compiled(scores, mask), ok.bilevel_weights(scores, mask).view(-1))


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values stored transposed (a 2-D tensor) or with a stride of 2 (1-D)."""
    if t.dim() == 2:
        return t.t().contiguous().t()
    return torch.stack([t, t], dim=1)[:, 0]


def test_opcheck_every_op_on_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    nc = _non_contiguous
    scores = nc(torch.rand(4, 7, generator=gen))
    mask = nc(torch.rand(4, 7, generator=gen) < 0.7)
    params = (0.3, 1.0, 0.1, True)
    torch.library.opcheck(torch.ops.oar.bilevel_weights.default, (scores, mask, *params))
    out = nc(torch.empty(4, 7))
    torch.library.opcheck(torch.ops.oar.bilevel_weights_into.default, (scores, mask, *params, out))
    adv = nc(torch.randn(4, 7, generator=gen))
    torch.library.opcheck(torch.ops.oar.reshape_advantages.default, (adv, scores, mask, *params))

    hidden = nc(torch.randn(6, 5, generator=gen)).requires_grad_()
    weight = nc(torch.randn(11, 5, generator=gen)).requires_grad_()
    targets = nc(torch.randint(0, 11, (6, 1), generator=gen)).squeeze(1)
    bias = nc(torch.randn(11, 1, generator=gen)).squeeze(1)
    torch.library.opcheck(
        torch.ops.oar.token_logprobs.default, (hidden, weight, targets, bias, 0.9, True)
    )
    row = nc(torch.randn(6, 2, generator=gen))[:, 0]
    torch.library.opcheck(
        torch.ops.oar.grpo_loss.default,
        (hidden, weight, targets, row, row.abs(), row.abs(), row - 1, row - 2, bias)
        + (0.2, 0.2, 0.1, 0.9),
    )
    grad = nc(torch.randn(2, 5, 3, generator=gen).transpose(1, 2).contiguous().transpose(1, 2))
    embeds = grad.flip(0)
    torch.library.opcheck(torch.ops.oar.saliency.default, (grad, embeds, mask[:2, :5]))


# ---------------------------------------------------------------------------- grpo_loss


def _loss_problem(seed=0, rows=3, length=6, vocab=13, width=8):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, length, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) / width**0.5
    targets = torch.randint(0, vocab, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, :2] = False
    adv = torch.randn(rows, length, generator=gen)
    old = -torch.rand(rows, length, generator=gen) * 3
    ref = -torch.rand(rows, length, generator=gen) * 3
    return hidden, weight, targets, mask, adv, old, ref


def _loss_and_grads(hidden, weight, targets, mask, adv, old, ref, loss_type):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    out = ok.grpo_loss(
        *leaves,
        targets,
        adv,
        mask,
        old_logprobs=old,
        ref_logprobs=ref,
        beta=0.1,
        loss_type=loss_type,
    )
    out.loss.backward()
    metrics = torch.stack([out.clip_fraction, out.mean_kl, out.mean_ratio])
    return out.loss.detach(), metrics, leaves[0].grad, leaves[1].grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -1e30])
def test_grpo_loss_ignores_whatever_padding_holds(loss_type, poison):
    hidden, weight, targets, mask, adv, old, ref = _loss_problem()
    clean = _loss_and_grads(hidden, weight, targets, mask, adv, old, ref, loss_type)
    bad = [torch.where(mask, t, poison) for t in (adv, old, ref)]
    dirty = _loss_and_grads(hidden, weight, targets, mask, *bad, loss_type)
    for name, a, b in zip(("loss", "metrics", "d hidden", "d weight"), dirty, clean):
        assert_verbose_allclose(a, b, rtol=1e-6, atol=1e-7, name=name)


def test_grpo_loss_refuses_double_backward():
    hidden, weight, targets, mask, adv, old, _ = _loss_problem()
    hidden.requires_grad_()
    out = ok.grpo_loss(hidden, weight, targets, adv, mask, old_logprobs=old)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.loss, hidden, create_graph=True)
    (grad,) = torch.autograd.grad(out.loss, hidden)  # a plain backward still works
    assert torch.isfinite(grad).all()


def test_grpo_loss_argument_errors_have_the_right_types():
    hidden, weight, targets, mask, adv, old, _ = _loss_problem()
    with pytest.raises(TypeError, match="old_logprobs"):
        ok.grpo_loss(hidden, weight, targets, adv, mask, old_logprobs=[[0.0]])
    with pytest.raises(TypeError, match="ref_logprobs"):
        ok.grpo_loss(hidden, weight, targets, adv, mask, ref_logprobs=old.long(), beta=0.1)
    with pytest.raises(ValueError, match="targets"):
        ok.grpo_loss(hidden, weight, targets[:, :3], adv, mask)
    with pytest.raises(ValueError, match="old_logprobs"):
        ok.grpo_loss(hidden, weight, targets, adv, mask, old_logprobs=old[:, :2])
    with pytest.raises(ValueError, match="weight"):
        ok.grpo_loss(hidden, weight[:0], targets, adv, mask)
    for name, value in (("beta", math.inf), ("epsilon_high", math.nan), ("temperature", math.inf)):
        with pytest.raises(ValueError, match=name):
            ok.grpo_loss(hidden, weight, targets, adv, mask, ref_logprobs=old, **{name: value})


# ------------------------------------------------------------------------ token_logprobs


def _masked_vocab_problem(seed=5, rows=7, vocab=29, width=6):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64)
    bias = torch.zeros(vocab, dtype=torch.float64)
    bias[vocab // 3 : vocab // 2] = -torch.inf  # a masked stretch, as vocab padding is
    bias[-3:] = -torch.inf
    allowed = torch.isfinite(bias).nonzero().squeeze(1)
    targets = allowed[torch.randint(0, len(allowed), (rows,), generator=gen)]
    return hidden, weight, targets, bias, allowed


def _reference_on_allowed(hidden, weight, targets, bias, allowed):
    """The reference over the finite columns only: what -inf columns must amount to."""
    remap = torch.full((weight.shape[0],), -1, dtype=torch.long)
    remap[allowed] = torch.arange(len(allowed))
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    lp, ent = token_logprobs_reference(
        leaves[0], leaves[1][allowed], remap[targets], bias=bias[allowed]
    )
    (lp.sum() + ent.sum()).backward()
    return lp.detach(), ent.detach(), leaves[0].grad, leaves[1].grad[allowed]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("vocab_chunk", [None, 4], ids=["one-chunk", "chunks-of-4"])
def test_entropy_and_its_gradient_with_minus_inf_logits(dtype, vocab_chunk, monkeypatch):
    if vocab_chunk:  # the first chunk of some rows can be all -inf
        monkeypatch.setattr(logprobs, "MIN_CHUNK_COLS", 1)
        monkeypatch.setitem(logprobs.CHUNK_BYTES, "cpu", 8 * 7 * vocab_chunk)
    hidden, weight, targets, bias, allowed = _masked_vocab_problem()
    want = _reference_on_allowed(hidden, weight, targets, bias, allowed)
    leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight)]
    lp, ent = ok.token_logprobs(*leaves, targets, bias=bias.to(dtype), return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    got = (lp, ent, leaves[0].grad, leaves[1].grad[allowed])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, a, b in zip(("logprobs", "entropy", "d hidden", "d weight"), got, want):
        assert_verbose_allclose(a, b, rtol=tol, atol=tol, name=name)
    assert (leaves[1].grad[torch.isinf(bias)] == 0).all()


def test_triton_steps_with_minus_inf_logits():
    device = triton_device_or_skip(logprobs.triton)
    hidden, weight, targets, bias, allowed = _masked_vocab_problem(rows=3)
    lp_want, ent_want, *_ = _reference_on_allowed(hidden, weight, targets, bias, allowed)
    h, w, b = (t.float().to(device) for t in (hidden, weight, bias))
    targets = targets.to(device)
    lp, ent, lse = logprobs.chunked_forward(h, w, targets, b, 1.0, True, logprobs._fold_triton)
    assert_verbose_allclose(lp, lp_want, rtol=1e-4, atol=1e-4, name="triton logprobs")
    assert_verbose_allclose(ent, ent_want, rtol=1e-4, atol=1e-4, name="triton entropy")
    ones = torch.ones(3, device=device)
    grads = [
        logprobs.chunked_backward(ones, ones, h, w, targets, b, lse, ent, 1.0, logits_grad=step)
        for step in (logprobs._logits_grad_triton, logprobs._logits_grad_torch)
    ]
    for name, a, b in zip(("d hidden", "d weight", "d bias"), *grads):
        assert torch.isfinite(a).all(), name
        assert_verbose_allclose(a, b, rtol=1e-5, atol=1e-6, name=f"triton {name}")


def test_entropy_stays_right_for_logits_near_float32_limits():
    # Two equal logits of 3e38 and one of 1.5e38: a sum of p * z overflows float32 (the
    # entropy came out -inf); sums centred on the max give log 2.
    hidden = torch.tensor([[3e38], [3e38]], requires_grad=True)
    weight = torch.tensor([[1.0], [1.0], [0.5]])
    lp, ent = ok.token_logprobs(hidden, weight, torch.tensor([0, 2]), return_entropy=True)
    assert torch.allclose(lp, torch.tensor([-math.log(2), -1.5e38]), rtol=1e-6)
    assert torch.allclose(ent, torch.full((2,), math.log(2)), rtol=1e-6)
    ent.sum().backward()
    assert torch.isfinite(hidden.grad).all()


# --------------------------------------------------------------------------- empty sizes


def test_lm_head_ops_with_zero_hidden_size():
    weight = torch.zeros(5, 0, requires_grad=True)
    hidden = torch.zeros(2, 3, 0, requires_grad=True)
    targets = torch.zeros(2, 3, dtype=torch.long)
    lp, ent = ok.token_logprobs(hidden, weight, targets, return_entropy=True)
    assert torch.allclose(lp, torch.full((2, 3), -math.log(5)))
    assert torch.allclose(ent, torch.full((2, 3), math.log(5)))
    lp.sum().backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = ok.grpo_loss(hidden, weight, targets, torch.ones(2), mask)
    assert torch.isfinite(out.loss) and out.logprobs.shape == (2, 3)


def test_cpp_reshape_gives_the_same_weights_on_any_number_of_threads():
    if not _extension.LOADED:
        pytest.skip(f"C++ extension not loaded: {_extension.STATUS}")
    # 64 rows of 4096: enough work for the helper threads to take rows.
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(64, 4096, generator=gen) ** 4
    mask = torch.rand(64, 4096, generator=gen) < 0.9
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ok.bilevel_weights(scores, mask)
        torch.set_num_threads(max(2, threads))
        shared = [ok.bilevel_weights(scores, mask) for _ in range(5)]
    finally:
        torch.set_num_threads(threads)
    for weights in shared:
        assert torch.equal(weights, alone)


def _raw_lm_head_calls():
    gen = torch.Generator().manual_seed(9)
    h, w = torch.randn(4, 3, generator=gen), torch.randn(7, 3, generator=gen)
    t, row = torch.randint(0, 7, (4,), generator=gen), torch.zeros(4)
    lp = torch.ops.oar.token_logprobs
    loss = torch.ops.oar.grpo_loss
    scalars = (0.2, 0.2, 0.0)
    return [
        ("lp-3d-hidden", lambda: lp(h[None], w, t, None, 1.0, False), ValueError, "hidden"),
        ("lp-temp-zero", lambda: lp(h, w, t, None, 0.0, False), ValueError, "temperature"),
        ("lp-temp-nan", lambda: lp(h, w, t, None, math.nan, False), ValueError, "temperature"),
        ("lp-float-targets", lambda: lp(h, w, t.float(), None, 1.0, False), TypeError, "targets"),
        ("lp-bias-shape", lambda: lp(h, w, t, torch.zeros(3), 1.0, False), ValueError, "bias"),
        ("lp-target-range", lambda: lp(h, w, t + 7, None, 1.0, False), ValueError, "targets"),
        (
            "loss-adv-shape",
            lambda: loss(h, w, t, row[:3], row, row, None, None, None, *scalars, 1.0),
            ValueError,
            "advantages",
        ),
        (
            "loss-old-int",
            lambda: loss(h, w, t, row, row, row, t, None, None, *scalars, 1.0),
            TypeError,
            "old_logprobs",
        ),
        (
            "loss-eps-inf",
            lambda: loss(h, w, t, row, row, row, None, None, None, math.inf, 0.2, 0.0, 1.0),
            ValueError,
            "epsilon_low",
        ),
        (
            "loss-temp-neg",
            lambda: loss(h, w, t, row, row, row, None, None, None, *scalars, -1.0),
            ValueError,
            "temperature",
        ),
    ]


@pytest.mark.parametrize("case", _raw_lm_head_calls(), ids=lambda c: c[0])
def test_raw_lm_head_ops_check_their_arguments(case):
    _, call, error, message = case
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tau=2.0), "tau"),
        (dict(beta=math.inf), "beta"),
        (dict(advantages=torch.tensor([math.nan, 1.0])), "advantages"),
        (dict(advantages=torch.ones(3)), "advantages"),
    ],
)
def test_oar_advantages_checks_the_reshape_before_the_importance_pass(kwargs, message, monkeypatch):
    from oar_kernels import pipeline

    def no_pass(*args, **kw):
        raise AssertionError("the importance pass ran before the arguments were checked")

    monkeypatch.setattr(pipeline, "run_gradient_importance", no_pass)
    ids = torch.ones(2, 6, dtype=torch.long)
    mask = torch.ones(2, 6, dtype=torch.bool)
    args = {"advantages": torch.ones(2), **kwargs}
    with pytest.raises(ValueError, match=message):
        ok.oar_advantages(torch.nn.Linear(1, 1), ids, mask, mask, None, **args)


# ------------------------------------------------ second round of probes (issue 11's class)


def test_public_ops_compile_with_dynamic_shapes():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    scores, mask = torch.rand(2, 5, generator=gen), torch.rand(2, 5, generator=gen) < 0.8
    adv = torch.randn(2, generator=gen)
    hidden = torch.randn(2, 3, 4, generator=gen, requires_grad=True)
    weight, targets = torch.randn(9, 4, generator=gen), torch.randint(0, 9, (2, 3), generator=gen)
    tokens = torch.ones(2, 3, dtype=torch.bool)
    calls = {
        "bilevel_weights": (lambda s, m: ok.bilevel_weights(s, m, tau=0.3), (scores, mask)),
        "reshape_advantages": (
            lambda a, s, m: ok.reshape_advantages(a, s, m, beta=2.0),
            (adv, scores, mask),
        ),
        "token_logprobs": (
            lambda h: ok.token_logprobs(h, weight, targets, temperature=0.7).sum(),
            (hidden,),
        ),
        "grpo_loss": (
            lambda h, a: ok.grpo_loss(h, weight, targets, a, tokens, epsilon_low=0.3).loss,
            (hidden, adv),
        ),
    }
    for name, (fn, args) in calls.items():
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
        assert torch.allclose(compiled(*args), fn(*args)), name


def test_grpo_loss_gradients_ignore_nan_hidden_states_in_padding():
    hidden, weight, targets, mask, adv, old, _ = _loss_problem()
    weight.requires_grad_()
    dirty = torch.where(mask[..., None], hidden, float("nan")).requires_grad_()
    ok.grpo_loss(dirty, weight, targets, adv, mask, old_logprobs=old).loss.backward()
    clean = hidden.clone().requires_grad_()
    weight_clean = weight.detach().clone().requires_grad_()
    ok.grpo_loss(clean, weight_clean, targets, adv, mask, old_logprobs=old).loss.backward()
    assert_verbose_allclose(weight.grad, weight_clean.grad, rtol=1e-6, atol=1e-7, name="d weight")
    assert_verbose_allclose(dirty.grad, clean.grad, rtol=1e-6, atol=1e-7, name="d hidden")


def test_reported_outputs_are_not_differentiable():
    hidden, weight, targets, mask, adv, old, ref = _loss_problem()
    hidden.requires_grad_()
    out = ok.grpo_loss(hidden, weight, targets, adv, mask, old_logprobs=old, ref_logprobs=ref)
    assert out.loss.requires_grad
    for name in ("logprobs", "clip_fraction", "mean_kl", "mean_ratio"):
        assert not getattr(out, name).requires_grad, name
    _, _, lse = torch.ops.oar.token_logprobs(hidden[0], weight, targets[0], None, 1.0, False)
    assert not lse.requires_grad


def test_grpo_loss_zero_advantage_and_zero_beta_never_multiply_inf_by_zero():
    hidden, weight, targets, mask, _, _, _ = _loss_problem()
    lp = ok.token_logprobs(hidden, weight, targets)
    hidden.requires_grad_()
    zero = torch.zeros(3, 6)
    # rho = e^100 overflows float32: with A = 0 the token still contributes exactly 0.
    out = ok.grpo_loss(hidden, weight, targets, zero, mask, old_logprobs=lp - 100)
    out.loss.backward()
    assert out.loss == 0 and torch.isfinite(hidden.grad).all()
    # beta = 0 drops the KL term even where k3 overflows (ref far above the policy).
    adv = torch.ones(3)
    out = ok.grpo_loss(hidden, weight, targets, adv, mask, ref_logprobs=lp + 100, beta=0.0)
    base = ok.grpo_loss(hidden, weight, targets, adv, mask)
    assert torch.isfinite(out.loss) and out.loss == base.loss


def test_raw_reshape_advantages_and_saliency_check_and_differentiate():
    gen = torch.Generator().manual_seed(12)
    scores, mask = torch.rand(2, 5, generator=gen), torch.rand(2, 5, generator=gen) < 0.8
    params = (0.25, 1.0, 0.1, True)
    with pytest.raises(ValueError, match="advantages"):
        torch.ops.oar.reshape_advantages(torch.ones(3), scores, mask, *params)
    with pytest.raises(TypeError, match="advantages"):
        torch.ops.oar.reshape_advantages(torch.ones(2, dtype=torch.long), scores, mask, *params)
    for shape in ((2,), (2, 5)):
        adv = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(
            torch.ops.oar.reshape_advantages.default, (adv, scores, mask, *params)
        )
        out = torch.ops.oar.reshape_advantages(adv, scores, mask, *params)
        (grad,) = torch.autograd.grad(out.sum(), adv)
        weights = ok.bilevel_weights(scores, mask).double()
        want = weights.sum(1) if len(shape) == 1 else weights
        assert torch.allclose(grad, want)

    from oar_kernels.importance.gradient import saliency_reference

    g = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    m = torch.rand(2, 3, generator=gen) < 0.7
    torch.library.opcheck(torch.ops.oar.saliency.default, (g, e, m))
    w = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((torch.ops.oar.saliency(g, e, m) * w).sum(), (g, e))
    want = torch.autograd.grad((saliency_reference(g, e, m) * w).sum(), (g, e))
    for a, b in zip(got, want):
        assert_verbose_allclose(a, b, rtol=1e-6, atol=1e-6, name="saliency grad")
    with pytest.raises(ValueError, match="score_mask"):
        torch.ops.oar.saliency(g, e, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="score_mask"):
        torch.ops.oar.saliency(g, e, torch.ones(2, 3))
    with pytest.raises(ValueError, match="embeds"):
        torch.ops.oar.saliency(g, e[:, :2], m)


def test_raw_logprob_ops_take_any_integer_targets_and_check_backward_shapes():
    gen = torch.Generator().manual_seed(13)
    h, w = torch.randn(4, 3, generator=gen), torch.randn(7, 3, generator=gen)
    t = torch.randint(0, 7, (4,), generator=gen)
    want = torch.ops.oar.token_logprobs(h, w, t, None, 1.0, False)[0]
    for dtype in (torch.uint8, torch.int16, torch.int32):
        got = torch.ops.oar.token_logprobs(h, w, t.to(dtype), None, 1.0, False)[0]
        assert torch.equal(got, want)
    lp, ent, lse = torch.ops.oar.token_logprobs(h, w, t, None, 1.0, True)
    backward = torch.ops.oar.token_logprobs_backward
    with pytest.raises(ValueError, match="grad_logprobs"):
        backward(lp[:2], ent, h, w, t, None, lse, ent, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        backward(lp, ent, h, w, t, None, lse, ent, 0.0)
    with pytest.raises(ValueError, match="entropy"):
        backward(lp, ent, h, w, t, None, lse, ent[:1], 1.0)
    with pytest.raises(TypeError, match="return_entropy"):
        ok.token_logprobs(h, w, t, return_entropy="no")


def test_cpp_mass_stays_exact_on_rows_of_millions():
    if not _extension.LOADED:
        pytest.skip(f"C++ extension not loaded: {_extension.STATUS}")
    gen = torch.Generator().manual_seed(14)
    scores = torch.rand(1, 2**22, generator=gen) ** 3
    weights = ok.bilevel_weights(scores, torch.ones_like(scores, dtype=torch.bool))
    assert abs(weights.double().mean().item() - 1.0) < 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_expanded_out_is_a_clear_error(path):
    if path == "cpp" and not _extension.LOADED:
        pytest.skip(f"C++ extension not loaded: {_extension.STATUS}")
    if path == "triton":
        triton_device_or_skip(reshape.triton)
    scores, mask = torch.rand(2, 5), torch.ones(2, 5, dtype=torch.bool)
    out = torch.empty(1, 5).expand(2, 5)
    args = (scores, mask, 0.25, 1.0, 0.1, True)
    with pytest.raises(ValueError, match="out"):
        if path == "cpp":
            torch.ops.oar.bilevel_weights_into(*args, out)
        elif path == "triton":
            reshape._bilevel_weights_triton(*args, out=out)
        else:
            reshape._bilevel_weights_torch(*args, out=out)


@pytest.mark.parametrize("method", ["gradient", "perturbation"])
def test_importance_ignores_dropout_and_restores_the_mode(method):
    from tests.helpers import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=3)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    gen = torch.Generator().manual_seed(15)
    ids = torch.randint(1, 50, (2, 10), generator=gen)
    attention = torch.ones(2, 10, dtype=torch.bool)
    score = torch.zeros(2, 10, dtype=torch.bool)
    score[:, 2:8] = True
    answer = torch.zeros(2, 10, dtype=torch.bool)
    answer[:, 8:] = True

    def scores():
        if method == "gradient":
            noise = torch.Generator().manual_seed(0)
            return ok.gradient_importance(
                model, ids, attention, score, answer, mode="answer_mean", generator=noise
            )
        return ok.perturbation_importance(
            model, ids, attention, score, answer, mode="answer_mean", mask_token_id=0
        )

    want = scores()  # eval mode
    model.train()
    got = [scores() for _ in range(2)]
    assert model.training and all(m.training for m in model.modules())
    for g in got:
        assert torch.equal(g, want)


def test_noise_std_beyond_one_is_refused():
    from tests.helpers import tiny_causal_lm

    model = tiny_causal_lm("llama")
    ids = torch.randint(1, 50, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.bool)
    score = mask.clone()
    score[:, -2:] = False
    with pytest.raises(ValueError, match="noise_std"):
        ok.gradient_importance(model, ids, mask, score, ~score, noise_std=1e19)


@pytest.mark.parametrize("path", PATHS)
def test_reshape_keeps_every_bit_of_subnormal_scores(path):
    # torch.log1p rounds subnormals (1e-45 -> 0, 3e-40 off by 4e-6 relative): the seed that
    # hypothesis found, and the smallest float32 beside zero.
    gen = torch.Generator().manual_seed(0)
    scores = torch.pow(10.0, -38 - 7 * torch.rand(2, 16, generator=gen, dtype=torch.float64))
    scores = torch.cat([scores.float(), torch.tensor([[1e-45, 0.0] * 8] * 1)], dim=0)
    mask = torch.ones(scores.shape, dtype=torch.bool)
    expected = reshape.bilevel_weights_reference(scores, mask, **DEFAULTS)
    got = _weights_by_path(path, scores, mask)
    assert_verbose_allclose(got, expected, rtol=1e-4, atol=1e-5, name=path)
