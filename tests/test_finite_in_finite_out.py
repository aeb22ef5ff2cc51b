"""Property: finite input never gives NaN or Inf (issue 11), for every public op and path.

Hypothesis draws dtypes, magnitudes from subnormal to near the dtype's maximum, ragged masks
and garbage (NaN, Inf) at positions the masks exclude. An op may refuse an input with a
ValueError naming the argument (advantages whose weighted values overflow float32), never
return a non-finite number for it.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oar_kernels as ok
from oar_kernels import _extension, logprobs, reshape
from oar_kernels.importance.batch import MODES
from oar_kernels.loss import LOSS_TYPES
from tests.helpers import assert_verbose_allclose

TRITON_HERE = reshape.triton is not None and (
    torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _magnitudes(dtype: torch.dtype, gen: torch.Generator, shape, low_exp: float, high_exp: float):
    """|x| = 10^e with e uniform in [low_exp, high_exp], clipped to the dtype's finite range."""
    e = low_exp + (high_exp - low_exp) * torch.rand(shape, generator=gen, dtype=torch.float64)
    values = torch.pow(10.0, e) * (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5)
    finfo = torch.finfo(dtype)
    return values.clamp(max=finfo.max).to(dtype)


def _exponent_range(dtype: torch.dtype, scale: str) -> tuple[float, float]:
    finfo = torch.finfo(dtype)
    smallest = math.log10(finfo.smallest_normal) - (3 if dtype != torch.bfloat16 else 2)
    largest = math.log10(finfo.max)
    return {
        "subnormal": (smallest, math.log10(finfo.smallest_normal)),
        "tiny": (smallest, -3.0),
        "unit": (-3.0, 3.0),
        "huge": (3.0, largest),
        "everything": (smallest, largest),
    }[scale]


def _ragged_mask(gen, rows, length, density, left_pad):
    mask = torch.rand(rows, length, generator=gen) < density
    lengths = torch.randint(0, length + 1, (rows,), generator=gen)
    cols = torch.arange(length)
    real = (cols >= length - lengths[:, None]) if left_pad else (cols < lengths[:, None])
    return mask & real


def _garbage_outside(values: torch.Tensor, mask: torch.Tensor, gen) -> torch.Tensor:
    junk = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=values.dtype)
    pick = junk[torch.randint(0, 3, values.shape, generator=gen)]
    return torch.where(mask, values, pick)


def _reshape_paths():
    paths = ["torch"]
    if _extension.LOADED:
        paths.append("cpp")
    if TRITON_HERE:
        paths.append("triton")
    return paths


def _weights(path, scores, mask):
    out = torch.full(scores.shape, float("nan"))
    args = (scores, mask, 0.25, 1.0, 0.1, True)
    if path == "cpp":
        torch.ops.oar.bilevel_weights_into(*args, out)
    elif path == "triton":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        moved = torch.full(scores.shape, float("nan"), device=device)
        reshape._bilevel_weights_triton(scores.to(device), mask.to(device), *args[2:], out=moved)
        out = moved.cpu()
    else:
        reshape._bilevel_weights_torch(*args, out=out)
    return out


@SETTINGS
@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    scale=st.sampled_from(["subnormal", "tiny", "unit", "huge", "everything"]),
    rows=st.integers(0, 5),
    length=st.integers(0, 40),
    density=st.sampled_from([0.1, 0.6, 1.0]),
    left_pad=st.booleans(),
    negative_share=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_reshape_weights_finite_and_right(
    dtype, scale, rows, length, density, left_pad, negative_share, seed
):
    gen = torch.Generator().manual_seed(seed)
    mask = _ragged_mask(gen, rows, length, density, left_pad)
    scores = _magnitudes(dtype, gen, (rows, length), *_exponent_range(dtype, scale))
    flip = torch.rand(rows, length, generator=gen) < negative_share
    scores = _garbage_outside(torch.where(flip, -scores, scores), mask, gen)
    expected = reshape.bilevel_weights_reference(scores, mask)
    assert torch.isfinite(expected).all()
    for path in _reshape_paths():
        got = _weights(path, scores, mask)
        assert torch.isfinite(got).all(), path
        assert_verbose_allclose(got, expected, rtol=1e-4, atol=1e-5, name=f"{path} {dtype}")


@SETTINGS
@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    scale=st.sampled_from(["subnormal", "unit", "huge", "everything"]),
    per_token=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_reshape_advantages_finite_or_refused(dtype, scale, per_token, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = _ragged_mask(gen, 4, 12, 0.7, left_pad=False)
    scores = _magnitudes(torch.float32, gen, (4, 12), -3, 3)
    shape = (4, 12) if per_token else (4,)
    advantages = _magnitudes(dtype, gen, shape, *_exponent_range(dtype, scale))
    advantages = advantages * (torch.rand(shape, generator=gen) < 0.5).to(dtype).mul(2).sub(1)
    try:
        out = ok.reshape_advantages(advantages, scores, mask)
    except ValueError as error:
        assert "advantages" in str(error)
        weights = ok.bilevel_weights(scores, mask).double()
        wide = advantages.double()
        wide = wide[:, None] if wide.dim() == 1 else wide
        assert not torch.isfinite((weights * wide).float()).all()  # refused only on overflow
        return
    assert torch.isfinite(out).all()


@SETTINGS
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    logit_exp=st.sampled_from([-30.0, -3.0, 0.0, 2.0, 10.0, 30.0, 37.0]),
    temperature=st.sampled_from([1.0, 0.5, 3.0]),
    masked_vocab=st.booleans(),
    rows=st.integers(0, 6),
    vocab=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_token_logprobs_finite(dtype, logit_exp, temperature, masked_vocab, rows, vocab, seed):
    if dtype == torch.bfloat16 and logit_exp > 30:
        logit_exp = 30.0  # bfloat16 GEMM products of two 1e18.5 factors round to inf
    gen = torch.Generator().manual_seed(seed)
    width = 4
    # logits ~ 10^logit_exp: hidden and weight each carry half the exponent.
    half = 10 ** (logit_exp / 2) / width**0.5
    hidden = (torch.randn(rows, width, generator=gen, dtype=torch.float64) * half).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen, dtype=torch.float64) * half).to(dtype)
    bias = torch.zeros(vocab, dtype=dtype)
    if masked_vocab and vocab > 1:
        bias[torch.randperm(vocab, generator=gen)[: vocab // 2]] = -torch.inf
    allowed = torch.isfinite(bias).nonzero().squeeze(1)
    targets = allowed[torch.randint(0, len(allowed), (rows,), generator=gen)]
    hidden.requires_grad_()
    weight.requires_grad_()
    lp, ent = ok.token_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True
    )
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (ent >= -1e-3).all()
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


@SETTINGS
@given(
    loss_type=st.sampled_from(LOSS_TYPES),
    adv_exp=st.sampled_from([-40.0, -5.0, 0.0, 6.0, 15.0]),
    per_token=st.booleans(),
    beta=st.sampled_from([0.0, 0.05]),
    density=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_grpo_loss_finite_whatever_the_padding_holds(
    loss_type, adv_exp, per_token, beta, density, seed
):
    gen = torch.Generator().manual_seed(seed)
    rows, length, width, vocab = 3, 7, 5, 17
    hidden = torch.randn(rows, length, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (rows, length), generator=gen)
    mask = _ragged_mask(gen, rows, length, density, left_pad=bool(seed % 2))
    shape = (rows, length) if per_token else (rows,)
    advantages = torch.randn(shape, generator=gen) * 10**adv_exp
    old = -torch.rand(rows, length, generator=gen) * 20
    ref = -torch.rand(rows, length, generator=gen) * 20
    if per_token:
        advantages = _garbage_outside(advantages, mask, gen)
    old, ref = (_garbage_outside(t, mask, gen) for t in (old, ref))
    out = ok.grpo_loss(
        hidden,
        weight,
        targets,
        advantages,
        mask,
        old_logprobs=old,
        ref_logprobs=ref,
        beta=beta,
        loss_type=loss_type,
    )
    for value in (out.loss, out.clip_fraction, out.mean_kl, out.mean_ratio):
        assert torch.isfinite(value), value
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("chunk_cols", [None, 3])
def test_minus_inf_logit_chunks_stay_finite(chunk_cols, monkeypatch):
    # A vocabulary chunk that is -inf for every row comes first: the running max is -inf.
    if chunk_cols:
        monkeypatch.setattr(logprobs, "MIN_CHUNK_COLS", 1)
        monkeypatch.setitem(logprobs.CHUNK_BYTES, "cpu", 4 * 4 * chunk_cols)
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(9, 3)
    bias = torch.zeros(9)
    bias[:3] = -torch.inf
    lp, ent = ok.token_logprobs(
        hidden, weight, torch.tensor([3, 4, 5, 8]), bias=bias, return_entropy=True
    )
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert torch.isfinite(hidden.grad).all()


def _valid_spans(gen, rows, length, left_pad):
    """Ragged rows with a score span and (maybe) an answer span obeying check_batch's rules."""
    attention = torch.zeros(rows, length, dtype=torch.bool)
    score = torch.zeros_like(attention)
    answer = torch.zeros_like(attention)
    for r in range(rows):
        size = int(torch.randint(2, length + 1, (1,), generator=gen))
        start = length - size if left_pad else 0
        attention[r, start : start + size] = True
        answer_len = int(torch.randint(0, min(3, size - 1) + 1, (1,), generator=gen))
        body_end = start + size - answer_len
        answer[r, body_end : start + size] = True
        score[r, start:body_end] = torch.rand(body_end - start, generator=gen) < 0.7
    return attention, score, answer


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["gradient", "perturbation"]),
    mode=st.sampled_from(MODES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    weight_scale=st.sampled_from([1e-3, 1.0, 30.0]),
    left_pad=st.booleans(),
    rows=st.integers(0, 3),
    length=st.integers(2, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_importance_and_oar_advantages_finite(
    method, mode, dtype, weight_scale, left_pad, rows, length, seed
):
    from tests.helpers import tiny_causal_lm

    model = tiny_causal_lm("qwen2", seed=seed % 3).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    gen = torch.Generator().manual_seed(seed)
    attention, score, answer = _valid_spans(gen, rows, length, left_pad)
    ids = torch.randint(1, 60, (rows, length), generator=gen)
    advantages = torch.randn(rows, generator=gen)
    extra = {"mask_token_id": 0} if method == "perturbation" else {}
    try:
        out = ok.oar_advantages(
            model, ids, attention, score, answer, advantages, method=method, mode=mode, **extra
        )
    except ValueError as error:  # refused only when the model itself overflows
        assert "non-finite" in str(error)
        return
    for name in ("advantages", "scores", "weights", "old_logprobs"):
        assert torch.isfinite(getattr(out, name)).all(), name
