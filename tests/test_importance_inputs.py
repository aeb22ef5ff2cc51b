"""What every importance entry point (OAR-G, OAR-P, and oar_advantages with either) does with
inputs at the edges: masks on padding, overlapping spans, empty batches, bad budgets and ids.
One table of calls runs through all four, so the ops stay consistent with each other."""

import math

import numpy as np
import pytest
import torch

import oar_kernels as ok
from oar_kernels.importance.batch import MODES
from tests.helpers import TINY_VOCAB, device_params, ragged_rollouts, tiny_causal_lm

MASK_ID = 0


def _gradient(model, *batch, **kw):
    return ok.gradient_importance(model, *batch, **kw)


def _perturbation(model, *batch, **kw):
    return ok.perturbation_importance(model, *batch, mask_token_id=MASK_ID, **kw)


def _advantages_gradient(model, *batch, **kw):
    rows = batch[0].shape[0] if isinstance(batch[0], torch.Tensor) else 4
    return ok.oar_advantages(model, *batch, torch.ones(rows), **kw).scores


def _advantages_perturbation(model, *batch, **kw):
    rows = batch[0].shape[0] if isinstance(batch[0], torch.Tensor) else 4
    return ok.oar_advantages(
        model, *batch, torch.ones(rows), method="perturbation", mask_token_id=MASK_ID, **kw
    ).scores


ENTRY_POINTS = {
    "gradient": _gradient,
    "perturbation": _perturbation,
    "oar_advantages-gradient": _advantages_gradient,
    "oar_advantages-perturbation": _advantages_perturbation,
}


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama")


def _batch(left_pad=False):
    """ids, attention, score, answer [4, 12]; row 1 has no answer span, rows 1-3 padding."""
    ids, attn, score, answer, _, _ = ragged_rollouts(seed=0, left_pad=left_pad)
    return ids, attn, score, answer


def _padding_of_row_1(attn):
    pad = torch.zeros_like(attn)
    pad[1] = ~attn[1]
    return pad


def _first_real(attn):
    first = torch.zeros_like(attn)
    first[torch.arange(attn.shape[0]), attn.long().argmax(dim=1)] = True
    return first


# ------------------------------------------------------------------ masks and padding


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("left_pad", [False, True], ids=["right-pad", "left-pad"])
def test_answer_mask_on_padding_is_an_error(model, entry, mode, left_pad):
    ids, attn, score, _ = _batch(left_pad)
    with pytest.raises(ValueError, match="answer_mask.*attention_mask"):
        ENTRY_POINTS[entry](model, ids, attn, score, _padding_of_row_1(attn), mode=mode)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("left_pad", [False, True], ids=["right-pad", "left-pad"])
def test_score_mask_on_padding_is_an_error(model, entry, left_pad):
    ids, attn, score, answer = _batch(left_pad)
    with pytest.raises(ValueError, match="score_mask.*attention_mask"):
        ENTRY_POINTS[entry](model, ids, attn, score | _padding_of_row_1(attn), answer)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_overlapping_score_and_answer_spans_are_an_error(model, entry):
    ids, attn, score, answer = _batch()
    with pytest.raises(ValueError, match="score_mask and answer_mask"):
        ENTRY_POINTS[entry](model, ids, attn, score | answer, answer)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("left_pad", [False, True], ids=["right-pad", "left-pad"])
def test_answer_on_a_rows_first_token_is_an_error(model, entry, mode, left_pad):
    # No position predicts a row's first token, so it cannot be an outcome token.
    ids, attn, score, _ = _batch(left_pad)
    first = _first_real(attn)
    with pytest.raises(ValueError, match="answer_mask.*first"):
        ENTRY_POINTS[entry](model, ids, attn, score & ~first, first, mode=mode)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_attention_mask_with_a_hole_is_an_error(model, entry):
    ids, attn, score, answer = _batch()
    attn = attn.clone()
    attn[0, 1] = False
    with pytest.raises(ValueError, match="attention_mask.*contiguous"):
        ENTRY_POINTS[entry](model, ids, attn, score & attn, answer)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("left_pad", [False, True], ids=["right-pad", "left-pad"])
def test_padding_rows_and_empty_spans_give_finite_scores(model, entry, mode, left_pad):
    """Row 0 all padding, row 1 nothing scored, row 2 no answer (the `last` fallback)."""
    ids, attn, score, answer = _batch(left_pad)
    attn, score, answer = attn.clone(), score.clone(), answer.clone()
    attn[0] = score[0] = answer[0] = False
    score[1] = False
    answer[2] = False
    kw = {"noise_std": 1e-3} if "gradient" in entry else {}
    got = ENTRY_POINTS[entry](model, ids, attn, score, answer, mode=mode, **kw)
    assert got.dtype == torch.float32 and got.shape == ids.shape
    assert torch.isfinite(got).all()
    assert torch.all(got[~score] == 0)
    assert got[2][score[2]].abs().sum() > 0


# ------------------------------------------------------------------------ empty sizes


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("shape", [(0, 12), (4, 0), (0, 0)], ids=["B=0", "T=0", "B=T=0"])
def test_empty_batches_give_empty_float32_scores(model, entry, shape):
    ids = torch.zeros(shape, dtype=torch.long)
    masks = [torch.zeros(shape, dtype=torch.bool) for _ in range(3)]
    got = ENTRY_POINTS[entry](model, ids, *masks)
    assert got.shape == shape and got.dtype == torch.float32


@pytest.mark.parametrize("method", ["gradient", "perturbation"])
@pytest.mark.parametrize("shape", [(0, 12), (4, 0)], ids=["B=0", "T=0"])
def test_oar_advantages_on_an_empty_batch_gives_empty_fields(model, method, shape):
    ids = torch.zeros(shape, dtype=torch.long)
    masks = [torch.zeros(shape, dtype=torch.bool) for _ in range(3)]
    out = ok.oar_advantages(
        model, ids, *masks, torch.ones(shape[0]), method=method, mask_token_id=MASK_ID
    )
    for field in (out.advantages, out.scores, out.weights, out.old_logprobs):
        assert field.shape == shape and field.dtype == torch.float32


# -------------------------------------------------------------------- argument checks


def _base_model():
    """The decoder without an lm head (what AutoModel gives instead of AutoModelForCausalLM)."""
    return tiny_causal_lm("llama").model


def _call_table():
    """(id, entry points, overrides of the call, error type, message regex)."""
    ids, attn, score, answer = _batch()
    both = tuple(ENTRY_POINTS)
    gradient = ("gradient", "oar_advantages-gradient")
    return [
        ("model-none", both, {"model": None}, TypeError, "model"),
        ("model-linear", both, {"model": torch.nn.Linear(2, 2)}, TypeError, "model"),
        ("model-no-lm-head", both, {"model": _base_model()}, TypeError, "model.*lm head"),
        ("ids-float", both, {"input_ids": ids.float()}, TypeError, "input_ids"),
        ("ids-list", both, {"input_ids": ids.tolist()}, TypeError, "input_ids"),
        ("ids-3d", both, {"input_ids": ids[None]}, ValueError, "input_ids"),
        ("ids-too-big", both, {"input_ids": ids + TINY_VOCAB}, ValueError, "input_ids"),
        ("ids-negative", both, {"input_ids": ids - TINY_VOCAB}, ValueError, "input_ids"),
        ("attn-shape", both, {"attention_mask": attn[:, :5]}, ValueError, "attention_mask"),
        ("answer-shape", both, {"answer_mask": answer[:2]}, ValueError, "answer_mask"),
        ("score-float", both, {"score_mask": score.float()}, TypeError, "score_mask"),
        ("attn-device", both, {"attention_mask": attn.to("meta")}, ValueError, "device"),
        ("mode", both, {"mode": "joint"}, ValueError, "mode"),
        ("budget-0", both, {"max_batch_tokens": 0}, ValueError, "max_batch_tokens"),
        ("budget-neg", both, {"max_batch_tokens": -5}, ValueError, "max_batch_tokens"),
        ("budget-float", both, {"max_batch_tokens": 2.5}, TypeError, "max_batch_tokens"),
        ("budget-bool", both, {"max_batch_tokens": True}, TypeError, "max_batch_tokens"),
        ("budget-str", both, {"max_batch_tokens": "64"}, TypeError, "max_batch_tokens"),
        ("noise-inf", gradient, {"noise_std": math.inf}, ValueError, "noise_std"),
        ("noise-nan", gradient, {"noise_std": math.nan}, ValueError, "noise_std"),
        ("noise-str", gradient, {"noise_std": "1e-3"}, TypeError, "noise_std"),
        ("noise-overflows", gradient, {"noise_std": 1e300}, ValueError, "noise_std"),
        ("generator-seed", gradient, {"generator": 3}, TypeError, "generator"),
    ]


def _bad_calls():
    ids, attn, score, answer = _batch()
    model = tiny_causal_lm("llama")
    for name, entries, overrides, error, message in _call_table():
        for entry in entries:
            call = dict(
                model=model,
                input_ids=ids,
                attention_mask=attn,
                score_mask=score,
                answer_mask=answer,
            )
            call.update(overrides)
            yield pytest.param(entry, call, error, message, id=f"{entry}-{name}")


@pytest.mark.parametrize("entry, call, error, message", _bad_calls())
def test_bad_input_raises_a_clear_error(entry, call, error, message):
    function = ENTRY_POINTS[entry]
    batch = [call.pop(k) for k in ("input_ids", "attention_mask", "score_mask", "answer_mask")]
    with pytest.raises(error, match=message):
        function(call.pop("model"), *batch, **call)


def test_numpy_integers_are_accepted_as_ints(model):
    ids, attn, score, answer = _batch()
    want = _perturbation(model, ids, attn, score, answer, max_batch_tokens=64)
    got = ok.perturbation_importance(
        model,
        ids,
        attn,
        score,
        answer,
        mask_token_id=np.int64(MASK_ID),
        max_batch_tokens=np.int64(64),
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", device_params())
def test_checks_and_empty_batches_on_the_models_device(device):
    model = tiny_causal_lm("llama").to(device)
    ids, attn, score, answer = (t.to(device) for t in _batch(left_pad=True))
    for entry in ENTRY_POINTS.values():
        assert torch.isfinite(entry(model, ids, attn, score, answer)).all()
        with pytest.raises(ValueError, match="answer_mask.*attention_mask"):
            entry(model, ids, attn, score, _padding_of_row_1(attn))
        empty = ids[:0]
        got = entry(model, empty, empty > 0, empty > 0, empty > 0)
        assert got.shape == (0, 12) and got.device == ids.device
    with pytest.raises(ValueError, match="device"):
        ok.gradient_importance(model, *(t.to("meta") for t in (ids, attn, score, answer)))
    # The noise may be drawn on another device (a CPU generator for a CUDA batch).
    seeded = [
        ok.gradient_importance(
            model, ids, attn, score, answer, generator=torch.Generator().manual_seed(5)
        )
        for _ in range(2)
    ]
    assert torch.equal(*seeded)
