"""Bi-Level reshape: every path against the float64 reference (SPEC section 6)."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oar_kernels as ok
from oar_kernels import _extension, reshape
from tests.helpers import (
    SCORE_KINDS,
    assert_python_passes,
    assert_verbose_allclose,
    check_bad_call,
    device_params,
    paper_numpy_weights,
    random_ragged_scores,
    triton_device_or_skip,
)

CUDA = torch.cuda.is_available()
# The fast paths compute in float32; the reference in float64 (worst seen: 2e-5 relative).
RTOL, ATOL = 1e-4, 1e-5
DEFAULTS = dict(tau=0.25, beta=1.0, floor=0.1, preserve_mass=True)


def _torch_path(scores, mask, *, out, tau, beta, floor, preserve_mass, **_):
    return reshape._bilevel_weights_torch(scores, mask, tau, beta, floor, preserve_mass, out=out)


def _cpp_path(scores, mask, *, out, tau, beta, floor, preserve_mass, **_):
    torch.ops.oar.bilevel_weights_into(scores, mask, tau, beta, floor, preserve_mass, out)


def _triton_path(scores, mask, *, out, tau, beta, floor, preserve_mass, block_size=None):
    return reshape._bilevel_weights_triton(
        scores, mask, tau, beta, floor, preserve_mass, out=out, block_size=block_size
    )


def _path_device(path: str) -> str:
    """Device a path runs on here, or skip with the reason it cannot run."""
    if path == "cpp":
        if not _extension.LOADED:
            pytest.skip(f"C++ extension not loaded: {_extension.STATUS}")
        return "cpu"
    if path == "triton":
        return triton_device_or_skip(reshape.triton)
    return "cpu"


PATHS = {"torch": _torch_path, "cpp": _cpp_path, "triton": _triton_path}


def _run_poisoned(path, scores, mask, **params):
    """Runs a path into an output pre-filled with NaN, so an unwritten element fails."""
    device = _path_device(path)
    scores, mask = scores.to(device), mask.to(device)
    out = torch.full(scores.shape, float("nan"), device=device)
    PATHS[path](scores, mask, out=out, **params)
    return out.cpu()


# ------------------------------------------------------------------ numerics vs reference


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 4),
    length=st.integers(0, 48),
    density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    kind=st.sampled_from(SCORE_KINDS),
    # A grid, not arbitrary floats: with tau ~ 1e-100 the threshold underflows float32 and the
    # SPEC's 1e-8 makes the weight at u = theta jump, so float32 paths cannot follow float64.
    tau=st.integers(0, 1000).map(lambda k: k / 1000),
    beta=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 5.0)),
    floor=st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 1.0)),
    preserve_mass=st.booleans(),
    # Mostly one chunk per row (the interpreter is slow); 16 forces the multi-chunk passes.
    block_size=st.sampled_from([None, None, None, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_path_matches_reference_on_random_ragged_batches(
    batch, length, density, kind, tau, beta, floor, preserve_mass, block_size, seed
):
    scores, mask = random_ragged_scores(batch, length, density=density, kind=kind, seed=seed)
    params = dict(tau=tau, beta=beta, floor=floor, preserve_mass=preserve_mass)
    expected = reshape.bilevel_weights_reference(scores, mask, **params)
    for path in PATHS:
        try:
            got = _run_poisoned(path, scores, mask, **params, block_size=block_size)
        except pytest.skip.Exception:
            continue
        assert_verbose_allclose(got, expected, rtol=RTOL, atol=ATOL, name=path)


@pytest.mark.parametrize("seed", range(20))
def test_reference_matches_paper_numpy_procedure(seed):
    rng = np.random.default_rng(seed)
    kind = SCORE_KINDS[seed % len(SCORE_KINDS)]
    scores, mask = random_ragged_scores(7, 200, density=0.7, kind=kind, seed=seed)
    params = dict(
        tau=float(rng.uniform()),
        beta=float(rng.uniform(0, 3)),
        floor=float(rng.uniform(0, 0.5)),
        preserve_mass=bool(seed % 2),
    )
    expected = paper_numpy_weights(scores.numpy(), mask.numpy(), **params)
    got = reshape.bilevel_weights_reference(scores, mask, **params)
    assert_verbose_allclose(got, expected, rtol=1e-12, atol=1e-12, name="reference")


@pytest.mark.parametrize("path", list(PATHS))
def test_rows_longer_than_one_block(path):
    # T = 32768 spans 8 Triton chunks of MAX_BLOCK; a second row is half scored.
    scores, mask = random_ragged_scores(2, 32768, density=1.0, kind="lognormal", seed=3)
    mask[1, ::2] = False
    expected = reshape.bilevel_weights_reference(scores, mask, **DEFAULTS)
    got = _run_poisoned(path, scores, mask, **DEFAULTS)
    assert_verbose_allclose(got, expected, rtol=RTOL, atol=ATOL, name=path)


@pytest.mark.parametrize("path", list(PATHS))
def test_non_contiguous_inputs_and_output(path):
    device = _path_device(path)
    scores, mask = random_ragged_scores(40, 9, density=0.8, kind="uniform", seed=5)
    scores_t, mask_t = scores.t().to(device), mask.t().to(device)  # [9, 40], strided
    out = torch.full((40, 9), float("nan"), device=device).t()
    PATHS[path](scores_t, mask_t, out=out, **DEFAULTS)
    expected = reshape.bilevel_weights_reference(scores_t.cpu(), mask_t.cpu(), **DEFAULTS)
    assert_verbose_allclose(out, expected, rtol=RTOL, atol=ATOL, name=path)


# --------------------------------------------------------------------- SPEC edge cases


@pytest.mark.parametrize("device", device_params())
def test_edge_rows_follow_spec(device):
    scores = torch.tensor(
        [
            [0.3, 0.9, 0.1, 0.5],  # no scored token -> ones
            [0.3, 7.0, 0.1, 0.5],  # one scored token -> u = 0 = theta -> weight 1
            [2.0, 2.0, 2.0, 2.0],  # constant -> all weights 1
            [-1.0, -3.0, -0.5, -2.0],  # negative scores clamp to 0 -> constant
            [0.0, 1.0, 3.0, 9.0],  # spread scores
        ],
        device=device,
    )
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    weights = ok.bilevel_weights(scores, mask.to(device)).cpu()
    assert torch.equal(weights[0], torch.ones(4))
    ones_within_eps = torch.tensor(1.0) / (1 + 1e-8)
    assert torch.allclose(weights[1:4], torch.ones(3, 4) * ones_within_eps, atol=1e-7)
    assert torch.isfinite(weights).all()
    # Mass is preserved over the scored tokens, and the reshape ranks like the scores.
    assert weights[4].mean().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(weights[4].diff() > 0)
    assert_verbose_allclose(
        weights, reshape.bilevel_weights_reference(scores.cpu(), mask), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("device", device_params())
def test_empty_batch_returns_empty(device):
    for shape in [(0, 5), (3, 0)]:
        weights = ok.bilevel_weights(
            torch.zeros(shape, device=device), torch.zeros(shape, device=device) > 0
        )
        assert weights.shape == shape and weights.dtype == torch.float32
        adv = ok.reshape_advantages(
            torch.zeros(shape[0], device=device),
            torch.zeros(shape, device=device),
            torch.zeros(shape, dtype=torch.bool, device=device),
        )
        assert adv.shape == shape


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_public_api_any_float_dtype_gives_float32(device, dtype):
    scores, mask = random_ragged_scores(6, 50, density=0.8, kind="lognormal", seed=11)
    scores = scores.clamp_max(1000).to(dtype)
    expected = reshape.bilevel_weights_reference(scores, mask, **DEFAULTS)
    weights = ok.bilevel_weights(scores.to(device), mask.int().to(device))
    assert weights.dtype == torch.float32
    assert_verbose_allclose(weights, expected, rtol=RTOL, atol=ATOL, name=str(dtype))


@pytest.mark.parametrize("device", device_params())
def test_reshape_advantages_broadcasts_and_keeps_sign(device):
    scores, mask = random_ragged_scores(4, 30, density=0.9, kind="uniform", seed=2)
    scores, mask = scores.to(device), mask.to(device)
    weights = ok.bilevel_weights(scores, mask)
    per_seq = torch.tensor([1.5, -2.0, 0.0, -0.25], dtype=torch.float64, device=device)
    per_token = ok.reshape_advantages(per_seq, scores, mask)
    assert per_token.dtype == torch.float32
    assert torch.equal(per_token, weights * per_seq.float()[:, None])
    # A [B, T] advantage multiplies element-wise.
    dense = torch.randn(4, 30, device=device)
    assert torch.equal(ok.reshape_advantages(dense, scores, mask), weights * dense)
    # Positive and negative advantages get the same weights.
    flipped = ok.reshape_advantages(-per_seq, scores, mask)
    assert torch.equal(flipped, -per_token)


@pytest.mark.parametrize("device", device_params())
def test_public_out_buffer_is_filled_and_returned(device):
    scores, mask = random_ragged_scores(5, 40, density=0.7, kind="lognormal", seed=4)
    scores, mask = scores.to(device), mask.to(device)
    # A transposed, NaN-poisoned buffer: every element must be written through its strides.
    out = torch.full((40, 5), float("nan"), device=device).t()
    returned = ok.bilevel_weights(scores, mask, out=out)
    assert returned is out
    expected = reshape.bilevel_weights_reference(scores.cpu(), mask.cpu(), **DEFAULTS)
    assert_verbose_allclose(out, expected, rtol=RTOL, atol=ATOL, name="out")


def test_weights_carry_no_gradient():
    scores = torch.rand(3, 8, requires_grad=True)
    weights = ok.bilevel_weights(scores, torch.ones(3, 8, dtype=torch.bool))
    assert not weights.requires_grad


# ------------------------------------------------------------------------- bad input


def _bad_calls():
    s = torch.rand(2, 5)
    m = torch.ones(2, 5, dtype=torch.bool)
    a = torch.ones(2)
    nan = s.clone()
    nan[1, 3] = float("nan")
    inf = s.clone()
    inf[0, 0] = float("inf")
    return [
        ("scores-not-tensor", lambda: ok.bilevel_weights([[1.0]], m), TypeError, "scores"),
        ("scores-int", lambda: ok.bilevel_weights(s.long(), m), TypeError, "scores"),
        ("scores-1d", lambda: ok.bilevel_weights(s[0], m[0]), ValueError, "scores"),
        ("mask-float", lambda: ok.bilevel_weights(s, m.float()), TypeError, "score_mask"),
        ("mask-shape", lambda: ok.bilevel_weights(s, m[:, :4]), ValueError, "score_mask"),
        ("scores-nan", lambda: ok.bilevel_weights(nan, m), ValueError, "scores must be finite"),
        ("scores-inf", lambda: ok.bilevel_weights(inf, m), ValueError, "scores must be finite"),
        ("tau-high", lambda: ok.bilevel_weights(s, m, tau=1.5), ValueError, "tau"),
        ("tau-nan", lambda: ok.bilevel_weights(s, m, tau=float("nan")), ValueError, "tau"),
        ("tau-str", lambda: ok.bilevel_weights(s, m, tau="0.2"), TypeError, "tau"),
        ("beta-neg", lambda: ok.bilevel_weights(s, m, beta=-0.1), ValueError, "beta"),
        ("floor-high", lambda: ok.bilevel_weights(s, m, floor=1.1), ValueError, "floor"),
        ("floor-neg", lambda: ok.bilevel_weights(s, m, floor=-0.1), ValueError, "floor"),
        (
            "preserve-int",
            lambda: ok.bilevel_weights(s, m, preserve_mass=1),
            TypeError,
            "preserve_mass",
        ),
        ("devices", lambda: ok.bilevel_weights(s, m.to("meta")), ValueError, "one device"),
        ("out-list", lambda: ok.bilevel_weights(s, m, out=[0.0]), TypeError, "out"),
        ("out-dtype", lambda: ok.bilevel_weights(s, m, out=s.double()), ValueError, "out"),
        ("out-shape", lambda: ok.bilevel_weights(s, m, out=s[:, :4]), ValueError, "out"),
        (
            "out-expanded",
            lambda: ok.bilevel_weights(s, m, out=torch.zeros(1, 5).expand(2, 5)),
            ValueError,
            "out",
        ),
        ("adv-shape", lambda: ok.reshape_advantages(torch.ones(3), s, m), ValueError, "advantages"),
        ("adv-int", lambda: ok.reshape_advantages(a.long(), s, m), TypeError, "advantages"),
        (
            "adv-nan",
            lambda: ok.reshape_advantages(a * float("nan"), s, m),
            ValueError,
            "advantages must be finite",
        ),
        ("adv-device", lambda: ok.reshape_advantages(a.to("meta"), s, m), ValueError, "one device"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    check_bad_call(case)


def test_nan_outside_score_mask_is_ignored():
    scores = torch.tensor([[0.5, float("nan"), 2.0]])
    weights = ok.bilevel_weights(scores, torch.tensor([[True, False, True]]))
    assert torch.isfinite(weights).all() and weights[0, 1] == 1


@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_rejects_non_finite_scores(path):
    device = _path_device(path)
    scores = torch.rand(3, 6, device=device)
    scores[2, 4] = float("-inf")
    mask = torch.ones(3, 6, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="scores must be finite"):
        PATHS[path](scores, mask, out=torch.empty(3, 6, device=device), **DEFAULTS)


# ---------------------------------------------------------------- op registration checks


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    scores, mask = random_ragged_scores(5, 33, density=0.7, kind="lognormal", seed=8)
    scores, mask = scores.to(device), mask.to(device)
    args = (0.3, 2.0, 0.05, True)
    torch.library.opcheck(torch.ops.oar.bilevel_weights.default, (scores, mask, *args))
    torch.library.opcheck(
        torch.ops.oar.reshape_advantages.default,
        (torch.randn(5, device=device), scores, mask, *args),
    )
    torch.library.opcheck(
        torch.ops.oar.bilevel_weights_into.default,
        (scores, mask, *args, torch.empty(5, 33, device=device)),
    )


@pytest.mark.parametrize("device", device_params())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    scores, mask = random_ragged_scores(4, 40, density=0.6, kind="uniform", seed=4)
    scores, mask, adv = scores.to(device), mask.to(device), torch.randn(4, device=device)

    @torch.compile(fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    def step(adv, scores, mask):
        return ok.reshape_advantages(adv * 2, scores.abs(), mask, tau=0.5) + 1

    expected = ok.reshape_advantages(adv * 2, scores.abs(), mask, tau=0.5) + 1
    assert torch.equal(step(adv, scores, mask), expected)


def test_cpp_portable_loops_match_reference():
    # The C++ kernel packs rows with AVX2 where the CPU has it; this runs its portable loops.
    if not _extension.LOADED:
        pytest.skip(f"C++ extension not loaded: {_extension.STATUS}")
    code = (
        "import torch, oar_kernels as ok\n"
        "from oar_kernels import reshape\n"
        "from tests.helpers import assert_verbose_allclose, random_ragged_scores\n"
        "for seed, kind in enumerate(['lognormal', 'ties', 'uniform', 'tiny']):\n"
        "    s, m = random_ragged_scores(9, 300, density=0.7, kind=kind, seed=seed)\n"
        "    out = torch.full(s.shape, float('nan'))\n"
        "    torch.ops.oar.bilevel_weights_into(s, m, 0.3, 1.0, 0.1, True, out)\n"
        "    assert_verbose_allclose(out, reshape.bilevel_weights_reference(s, m, tau=0.3),\n"
        "                            rtol=1e-4, atol=1e-5, name=kind)\n"
    )
    assert_python_passes(code, OAR_KERNELS_CPU_BASELINE="1")
