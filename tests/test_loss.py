"""grpo_loss: the fused loss against the unfused reference (`loss.grpo_loss_reference`: full
logits -> log_softmax -> TRL's formula), values, metrics and gradients, for every loss_type
(SPEC section 7)."""

import pytest
import torch

import oar_kernels as ok
from oar_kernels import logprobs
from oar_kernels import loss as loss_module
from tests.helpers import (
    assert_verbose_allclose,
    check_bad_call,
    device_params,
    triton_device_or_skip,
)

TOLERANCE = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (5e-2, 5e-3),
    torch.float64: (1e-9, 1e-12),
}


def _batch(dtype, device, *, seed=0, rows=3, length=7, width=16, vocab=53, per_token=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, length, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) / width**0.5
    bias = torch.randn(vocab, generator=gen) * 0.1
    targets = torch.randint(0, vocab, (rows, length), generator=gen)
    shape = (rows, length) if per_token else (rows,)
    advantages = torch.randn(shape, generator=gen)
    mask = torch.rand(rows, length, generator=gen) < 0.8
    mask[0] = False  # a row with no completion token
    # Old/ref logprobs near the current ones, so ratios straddle the clip range.
    with torch.no_grad():
        logps = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets[..., None])[
            ..., 0
        ]
    old = logps + 0.4 * torch.randn(rows, length, generator=gen)
    ref = logps + 0.3 * torch.randn(rows, length, generator=gen)
    to = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    return {
        k: to(v)
        for k, v in dict(
            hidden=hidden,
            weight=weight,
            bias=bias,
            targets=targets,
            advantages=advantages,
            mask=mask,
            old=old,
            ref=ref,
        ).items()
    }


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


# grpo_loss's two ways to its gradients: one walk over row chunks (3 GEMMs a chunk), or
# token_logprobs' forward walk and recomputing backward walk (4).
WALKS = ["one", "two"]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", loss_module.LOSS_TYPES)
@pytest.mark.parametrize(
    "with_bias, with_kl, per_token",
    [(False, False, True), (True, True, True), (False, True, False)],
)
@pytest.mark.parametrize("walk", WALKS)
def test_matches_unfused_reference(
    device, dtype, loss_type, with_bias, with_kl, per_token, walk, monkeypatch
):
    monkeypatch.setattr(loss_module, "WALK", walk)
    monkeypatch.setitem(logprobs.CHUNK_BYTES, device, 4 * 53 * 4)  # several chunks
    monkeypatch.setattr(logprobs, "WORK_BYTES", 4 * 4 * 5)  # the one walk folds in blocks
    monkeypatch.setattr(logprobs, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(logprobs, "MIN_CHUNK_COLS", 1)
    b = _batch(dtype, device, per_token=per_token)
    kwargs = dict(
        old_logprobs=b["old"],
        ref_logprobs=b["ref"] if with_kl else None,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=0.05 if with_kl else 0.0,
        temperature=0.9,
    )
    leaves = [b["hidden"].clone().requires_grad_(), b["weight"].clone().requires_grad_()]
    bias = b["bias"].clone().requires_grad_() if with_bias else None
    out = ok.grpo_loss(*leaves, b["targets"], b["advantages"], b["mask"], bias=bias, **kwargs)
    got_grads = _grads(out.loss, leaves + ([bias] if with_bias else []))

    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref_bias = bias.detach().double().cpu().requires_grad_() if with_bias else None
    cpu64 = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    ref_kwargs = {k: cpu64(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    ref_kwargs["epsilon_high"] = 0.28
    loss, metrics, logps = loss_module.grpo_loss_reference(
        *ref_leaves,
        b["targets"].cpu(),
        cpu64(b["advantages"]),
        b["mask"].cpu(),
        bias=ref_bias,
        **ref_kwargs,
    )
    want_grads = _grads(loss, ref_leaves + ([ref_bias] if with_bias else []))

    rtol, atol = TOLERANCE[dtype]
    name = f"{device}/{dtype}/{loss_type}"
    assert_verbose_allclose(out.loss, loss, rtol=rtol, atol=atol, name=f"{name} loss")
    got_metrics = [out.clip_fraction, out.mean_kl, out.mean_ratio]
    assert_verbose_allclose(
        torch.stack(got_metrics), torch.stack(metrics), rtol=rtol, atol=atol, name=f"{name} metrics"
    )
    assert_verbose_allclose(out.logprobs, logps, rtol=rtol, atol=atol, name=f"{name} logprobs")
    for label, got, want in zip(("d hidden", "d weight", "d bias"), got_grads, want_grads):
        scale = want.abs().max().item()
        assert_verbose_allclose(
            got.float(), want, rtol=rtol, atol=atol * max(scale, 1e-3) * 10, name=f"{name} {label}"
        )


@pytest.mark.parametrize("walk", WALKS)
def test_gradcheck_float64(walk, monkeypatch):
    monkeypatch.setattr(loss_module, "WALK", walk)
    monkeypatch.setitem(logprobs.CHUNK_BYTES, "cpu", 4 * 9 * 3)  # row chunks of 3 of 8 rows
    monkeypatch.setattr(logprobs, "MIN_CHUNK_ROWS", 1)
    b = _batch(torch.float64, "cpu", rows=2, length=4, width=5, vocab=9)
    hidden, weight = b["hidden"].requires_grad_(), b["weight"].requires_grad_()

    def loss(h, w):
        return ok.grpo_loss(
            h,
            w,
            b["targets"],
            b["advantages"],
            b["mask"],
            old_logprobs=b["old"],
            ref_logprobs=b["ref"],
            beta=0.1,
            temperature=0.7,
        ).loss

    # gradcheck's reentrancy check runs backward twice through one graph, which grpo_loss
    # refuses (it scales its gradients in place): central differences against one backward.
    (analytic_h, analytic_w) = torch.autograd.grad(loss(hidden, weight), (hidden, weight))
    for leaf, analytic in ((hidden, analytic_h), (weight, analytic_w)):
        numeric = torch.zeros_like(leaf)
        with torch.no_grad():
            for i in range(leaf.numel()):
                flat = leaf.view(-1)
                flat[i] += 1e-6
                up = loss(hidden, weight)
                flat[i] -= 2e-6
                down = loss(hidden, weight)
                flat[i] += 1e-6
                numeric.view(-1)[i] = (up - down) / 2e-6
        assert_verbose_allclose(analytic, numeric, rtol=1e-5, atol=1e-7, name="gradient")


def test_on_policy_ratio_is_one_and_gradient_is_minus_advantage():
    b = _batch(torch.float64, "cpu")
    hidden = b["hidden"].requires_grad_()
    out = ok.grpo_loss(
        hidden, b["weight"], b["targets"], b["advantages"], b["mask"], loss_type="bnpo"
    )
    assert out.mean_ratio.item() == pytest.approx(1.0) and out.clip_fraction.item() == 0.0
    # d loss / d logprob_t = -A_t / count, so the loss equals -sum(m A) / count at ratio 1.
    m = b["mask"].double()
    assert out.loss.item() == pytest.approx((-(m * b["advantages"]).sum() / m.sum()).item())


# TRL's normalisers (dr_grpo's generation budget, dapo's token count of the step).
NORMALISERS = {
    "batch": {},
    "dr_grpo-budget": {"loss_type": "dr_grpo", "max_completion_length": 12},
    "dapo-count": {"loss_type": "dapo", "num_items_in_batch": 40},
    "dapo-tensor": {"loss_type": "dapo", "num_items_in_batch": torch.tensor(17.5)},
}


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("normaliser", list(NORMALISERS)[1:])
def test_trl_normalisers_match_the_reference(normaliser, walk, monkeypatch):
    monkeypatch.setattr(loss_module, "WALK", walk)
    b = _batch(torch.float64, "cpu")
    kwargs = dict(
        old_logprobs=b["old"], ref_logprobs=b["ref"], beta=0.05, **NORMALISERS[normaliser]
    )
    leaves = [b["hidden"].clone().requires_grad_(), b["weight"].clone().requires_grad_()]
    args = (b["targets"], b["advantages"], b["mask"])
    got = ok.grpo_loss(*leaves, *args, **kwargs)
    got_grads = _grads(got.loss, leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    want, _, _ = loss_module.grpo_loss_reference(*ref_leaves, *args, **kwargs)
    want_grads = _grads(want, ref_leaves)
    assert_verbose_allclose(got.loss, want, rtol=1e-9, atol=1e-12, name=f"{normaliser} loss")
    for label, g, w in zip(("d hidden", "d weight"), got_grads, want_grads):
        assert_verbose_allclose(g, w, rtol=1e-9, atol=1e-12, name=f"{normaliser} {label}")
    # The normaliser is what it says: the same masked sum over another count.
    plain = {k: v for k, v in kwargs.items() if k not in NORMALISERS[normaliser]}
    default = ok.grpo_loss(*leaves, *args, loss_type=kwargs["loss_type"], **plain)
    mask = b["mask"].double()
    if kwargs["loss_type"] == "dr_grpo":
        counts = (mask.shape[1], kwargs["max_completion_length"])
    else:
        counts = (mask.sum(), kwargs["num_items_in_batch"])
    assert_verbose_allclose(
        got.loss * counts[1], default.loss * counts[0], rtol=1e-12, atol=1e-12, name="sum"
    )


@pytest.mark.parametrize("normaliser", NORMALISERS)
def test_compile_fullgraph_and_opcheck(normaliser):
    b = _batch(torch.float32, "cpu")
    hidden, weight = b["hidden"].requires_grad_(), b["weight"].requires_grad_()
    normalise = NORMALISERS[normaliser]
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(h, w):
        out = ok.grpo_loss(
            h, w, b["targets"], b["advantages"], b["mask"], old_logprobs=b["old"], **normalise
        )
        return out.loss, out.clip_fraction

    loss, clip = step(hidden, weight)
    eager = ok.grpo_loss(
        hidden, weight, b["targets"], b["advantages"], b["mask"], old_logprobs=b["old"], **normalise
    )
    assert torch.allclose(loss, eager.loss) and torch.allclose(clip, eager.clip_fraction)
    for got, want in zip(
        torch.autograd.grad(loss, (hidden, weight)),
        torch.autograd.grad(eager.loss, (hidden, weight)),
    ):
        assert torch.allclose(got, want, atol=1e-6)
    n = b["targets"].numel()
    # The op takes the normalisers as per-token weights: those grpo_loss builds. opcheck
    # backpropagates |loss| and compares the outputs after it; the backward scales the
    # gradients the op returned in place (to hold them once), by -1 for a negative loss, so
    # the advantages are negative here: a positive loss.
    mask = b["mask"].float()
    token_weight = loss_module._aggregation_weights(
        mask,
        normalise.get("loss_type", "grpo"),
        normalise.get("max_completion_length"),
        normalise.get("num_items_in_batch"),
    )
    torch.library.opcheck(
        torch.ops.oar.grpo_loss.default,
        (
            hidden.detach().reshape(n, -1).requires_grad_(),
            weight,
            b["targets"].reshape(-1),
            -b["advantages"].abs().reshape(-1),
            token_weight.reshape(-1),
            (mask / mask.sum()).reshape(-1),
            b["old"].reshape(-1),
            None,
            None,
            0.2,
            0.2,
            0.0,
            1.0,
        ),
    )


def _bad_calls():
    b = _batch(torch.float32, "cpu")
    h, w, t, a, m = b["hidden"], b["weight"], b["targets"], b["advantages"], b["mask"]
    defaults = dict(hidden=h, weight=w, targets=t, advantages=a, mask=m)

    def call(**overrides):
        return ok.grpo_loss(**{**defaults, **overrides})

    return [
        ("hidden-2d", lambda: call(hidden=h[0]), ValueError, "hidden"),
        ("loss-type", lambda: call(loss_type="ppo"), ValueError, "loss_type"),
        ("adv-shape", lambda: call(advantages=a[:, :3]), ValueError, "advantages"),
        ("mask-float", lambda: call(mask=m.float()), TypeError, "mask"),
        ("old-shape", lambda: call(old_logprobs=b["old"][:, :2]), ValueError, "old_logprobs"),
        ("beta-no-ref", lambda: call(beta=0.1), ValueError, "ref_logprobs"),
        ("eps-neg", lambda: call(epsilon_low=-0.1), ValueError, "epsilon_low"),
        ("targets-range", lambda: call(targets=t + 100), ValueError, r"\[0, 53\)"),
        ("targets-float", lambda: call(targets=t.float()), TypeError, "targets"),
        ("budget-not-dr", lambda: call(max_completion_length=12), ValueError, "dr_grpo"),
        (
            "budget-short",
            lambda: call(loss_type="dr_grpo", max_completion_length=6),
            ValueError,
            "max_completion_length",
        ),
        (
            "budget-float",
            lambda: call(loss_type="dr_grpo", max_completion_length=12.0),
            TypeError,
            "max_completion_length",
        ),
        ("count-not-dapo", lambda: call(num_items_in_batch=10), ValueError, "'dapo' only"),
        (
            "count-zero",
            lambda: call(loss_type="dapo", num_items_in_batch=0),
            ValueError,
            "num_items_in_batch",
        ),
        (
            "count-vector",
            lambda: call(loss_type="dapo", num_items_in_batch=torch.ones(2)),
            TypeError,
            "num_items_in_batch",
        ),
        (
            "count-text",
            lambda: call(loss_type="dapo", num_items_in_batch="10"),
            TypeError,
            "num_items_in_batch",
        ),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    check_bad_call(case)


def test_triton_chunk_steps_in_the_fused_loss(monkeypatch):
    device = triton_device_or_skip(logprobs.triton)
    monkeypatch.setattr(
        logprobs, "chunk_steps", lambda h: (logprobs._fold_triton, logprobs._logits_grad_triton)
    )
    b = _batch(torch.float32, device, vocab=300)
    hidden = b["hidden"].requires_grad_()
    kwargs = dict(old_logprobs=b["old"], ref_logprobs=b["ref"], beta=0.05, temperature=0.8)
    got = ok.grpo_loss(hidden, b["weight"], b["targets"], b["advantages"], b["mask"], **kwargs)
    (got_grad,) = torch.autograd.grad(got.loss, hidden)
    monkeypatch.undo()
    want = ok.grpo_loss(hidden, b["weight"], b["targets"], b["advantages"], b["mask"], **kwargs)
    (want_grad,) = torch.autograd.grad(want.loss, hidden)
    assert_verbose_allclose(got.loss, want.loss, rtol=1e-5, atol=1e-6, name="loss")
    assert_verbose_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6, name="d hidden")


def test_a_second_backward_through_one_loss_is_refused_not_doubled():
    # The saved gradients are scaled in place (no second copy of them): autograd then refuses
    # a second pass over the same graph instead of scaling twice.
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, 3, 4, generator=gen, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3), generator=gen)
    out = ok.grpo_loss(hidden, weight, targets, torch.ones(2), torch.ones(2, 3, dtype=torch.bool))
    (3 * out.loss).backward(retain_graph=True)
    first = hidden.grad.clone()
    fresh = hidden.detach().clone().requires_grad_()
    again = ok.grpo_loss(fresh, weight, targets, torch.ones(2), torch.ones(2, 3, dtype=torch.bool))
    (3 * again.loss).backward()
    assert torch.allclose(first, fresh.grad)
    with pytest.raises(RuntimeError, match="once per call"):
        out.loss.backward()


@pytest.mark.parametrize("walk", WALKS)
def test_no_gradient_walk_without_a_graph_to_feed(walk, monkeypatch):
    monkeypatch.setattr(loss_module, "WALK", walk)
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 3, 4, generator=gen, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen)
    targets = torch.randint(0, 7, (2, 3), generator=gen)
    args = (targets, torch.ones(2), torch.ones(2, 3, dtype=torch.bool))
    calls = []
    spied = "_one_walk" if walk == "one" else "lm_head_backward"
    real = getattr(loss_module, spied)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loss_module, spied, lambda *a, **k: calls.append(1) or real(*a, **k))
        with_graph = ok.grpo_loss(hidden, weight, *args)
        assert calls == [1]  # the spy sees the walk when there is a graph to feed
        with torch.no_grad():
            no_grad = ok.grpo_loss(hidden, weight, *args)
        frozen = ok.grpo_loss(hidden.detach(), weight, *args)
    assert calls == [1]
    for out in (no_grad, frozen):
        assert torch.equal(out.loss, with_graph.loss.detach()) and not out.loss.requires_grad
    flat = (hidden.detach().reshape(6, 4), weight, targets.reshape(-1)) + (torch.ones(6),) * 3
    raw = torch.ops.oar.grpo_loss(*flat, None, None, None, 0.2, 0.2, 0.0, 1.0, False)
    assert [t.shape for t in raw[3:]] == [(0,), (0,), (0,)]
