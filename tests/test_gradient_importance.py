"""OAR-G against a per-sequence float64 transcription of SPEC section 5 on tiny random
Llama / Qwen2 models built here (no downloads)."""

import copy

import pytest
import torch

import oar_kernels as ok
from oar_kernels.importance import gradient
from oar_kernels.importance.batch import MODES
from oar_kernels.importance.causal_lm import position_ids_from
from tests.helpers import (
    assert_verbose_allclose,
    check_bad_call,
    device_params,
    triton_device_or_skip,
)
from tests.helpers import (
    ragged_rollouts as ragged_batch,
)
from tests.helpers import (
    tiny_causal_lm as tiny_model,
)


def reference_row(model64, ids, score, answer, mode, noise):
    """SPEC section 5 for one unpadded row, float64, full logits, the obvious way."""
    embeds = model64.get_input_embeddings()(ids[None]).detach()

    def logits_of(e):
        return model64(inputs_embeds=e).logits[0]

    answer_pos = answer.nonzero().flatten().tolist()
    row_mode = mode if answer_pos else "last"

    def outcome(e):
        logits = logits_of(e)
        if row_mode == "answer_joint":
            logp = torch.log_softmax(logits, -1)
            return torch.stack([logp[t - 1, ids[t]] for t in answer_pos]).mean()
        if row_mode == "answer_mean":
            return torch.log_softmax(torch.stack([logits[t - 1] for t in answer_pos]).mean(0), -1)
        pos = answer_pos[0] - 1 if answer_pos else len(ids) - 1
        return torch.log_softmax(logits[pos], -1)

    leaf = embeds.clone().requires_grad_()
    noisy = leaf + noise[None] * score[None, :, None]
    if row_mode == "answer_joint":
        objective = outcome(embeds).detach() - outcome(noisy)
    else:
        clean = outcome(embeds).detach()
        objective = (clean.exp() * (clean - outcome(noisy))).sum()
    (grad,) = torch.autograd.grad(objective, leaf)
    return torch.where(score, (grad[0] * embeds[0]).sum(-1).abs(), 0.0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("left_pad", [False, True], ids=["right-pad", "left-pad"])
def test_batched_float64_matches_per_sequence_reference(kind, mode, left_pad):
    model64 = tiny_model(kind).double()
    ids, attn, score, answer, noise, per_row = ragged_batch(seed=3, left_pad=left_pad)
    got = ok.gradient_importance(model64, ids, attn, score, answer, mode=mode, _noise=noise)
    for r, (row_ids, s, a, row_noise, cols) in enumerate(per_row):
        want = reference_row(model64, row_ids, s, a, mode, row_noise)
        assert_verbose_allclose(got[r, cols], want, rtol=1e-5, atol=1e-12, name=f"row {r}")
        assert torch.all(got[r][~score[r]] == 0)


@pytest.mark.parametrize("mode", MODES)
def test_float32_model_close_to_float64_reference(mode):
    model = tiny_model("llama")
    model64 = copy.deepcopy(model).double()
    ids, attn, score, answer, noise, per_row = ragged_batch(seed=5, left_pad=True)
    got = ok.gradient_importance(model, ids, attn, score, answer, mode=mode, _noise=noise.float())
    for r, (row_ids, s, a, row_noise, cols) in enumerate(per_row):
        want = reference_row(model64, row_ids, s, a, mode, row_noise)
        scale = want.abs().max().item()
        assert_verbose_allclose(got[r, cols], want, rtol=2e-2, atol=2e-2 * scale, name=f"row {r}")


def test_left_and_right_padding_give_the_same_scores():
    model = tiny_model("qwen2").double()
    right = ragged_batch(seed=7, left_pad=False)
    left = ragged_batch(seed=7, left_pad=True)
    got_r = ok.gradient_importance(model, *right[:4], _noise=right[4])
    got_l = ok.gradient_importance(model, *left[:4], _noise=left[4])
    for (_, _, _, _, cols_r), (_, _, _, _, cols_l), r in zip(right[5], left[5], range(4)):
        assert_verbose_allclose(got_r[r, cols_r], got_l[r, cols_l], rtol=1e-6, atol=1e-14)


def test_micro_batches_equal_one_batch_and_seeded_runs_repeat():
    model = tiny_model("llama")
    ids, attn, score, answer, *_ = ragged_batch(seed=2, left_pad=False)
    run = lambda **kw: ok.gradient_importance(  # noqa: E731
        model, ids, attn, score, answer, generator=torch.Generator().manual_seed(11), **kw
    )
    whole = run()
    assert torch.equal(whole, run())
    # float32 sums in another batch order: the saliency dot amplifies last-place differences.
    assert_verbose_allclose(run(max_batch_tokens=13), whole, rtol=1e-3, atol=1e-7)
    assert not torch.equal(
        whole,
        ok.gradient_importance(
            model, ids, attn, score, answer, generator=torch.Generator().manual_seed(12)
        ),
    )


def test_parameter_gradients_untouched_and_flags_restored():
    model = tiny_model("llama")
    first = next(model.parameters())
    first.grad = torch.full_like(first, 3.0)
    model.lm_head.weight.requires_grad_(False)
    ids, attn, score, answer, *_ = ragged_batch(seed=1, left_pad=True)
    ok.gradient_importance(model, ids, attn, score, answer, mode="answer_mean")
    assert torch.equal(first.grad, torch.full_like(first, 3.0))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert first.requires_grad and not model.lm_head.weight.requires_grad


def test_zero_noise_allowed_in_joint_mode_only():
    model = tiny_model("llama")
    ids, attn, score, answer, *_ = ragged_batch(seed=4, left_pad=False)
    scores = ok.gradient_importance(model, ids, attn, score, answer, noise_std=0.0)
    assert scores[0][score[0]].abs().sum() > 0
    with pytest.raises(ValueError, match="noise_std"):
        ok.gradient_importance(model, ids, attn, score, answer, mode="last", noise_std=0.0)
    with pytest.raises(ValueError, match="noise_std.*underflows"):
        ok.gradient_importance(model, ids, attn, score, answer, mode="last", noise_std=1e-60)


def test_without_noise_rows_falling_back_to_last_score_exactly_zero():
    # The `last` KL's gradient is exactly 0 at no noise: rounding error must not become
    # scores, which the reshape would stretch into arbitrary weights.
    model = tiny_model("llama")
    ids, attn, score, answer, *_ = ragged_batch(seed=4, left_pad=True)
    assert not answer[1].any()  # row 1 falls back to `last`
    scores = ok.gradient_importance(model, ids, attn, score, answer, noise_std=0.0)
    assert torch.all(scores[1] == 0)
    assert scores[0][score[0]].abs().sum() > 0
    weights = ok.oar_advantages(model, ids, attn, score, answer, torch.ones(4)).weights
    assert torch.all(weights[1] == 1)


def _bad_calls():
    model = tiny_model("llama")
    ids, attn, score, answer, *_ = ragged_batch(seed=0, left_pad=False)
    defaults = dict(
        model=model, input_ids=ids, attention_mask=attn, score_mask=score, answer_mask=answer
    )

    def call(**overrides):
        return ok.gradient_importance(**{**defaults, **overrides})

    return [
        ("mode", lambda: call(mode="joint"), ValueError, "mode"),
        ("ids-float", lambda: call(input_ids=ids.float()), TypeError, "input_ids"),
        ("score-shape", lambda: call(score_mask=score[:, :3]), ValueError, "score_mask"),
        ("attn-float", lambda: call(attention_mask=attn.float()), TypeError, "attention_mask"),
        ("noise-neg", lambda: call(noise_std=-1.0), ValueError, "noise_std"),
        ("ids-int16", lambda: call(input_ids=ids.short()), TypeError, "input_ids"),
        ("ids-bool", lambda: call(input_ids=ids > 3), TypeError, "input_ids"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    check_bad_call(case)


# ------------------------------------------------------------------- saliency reduction


@pytest.mark.parametrize("device", device_params())
def test_saliency_op_matches_reference(device):
    gen = torch.Generator().manual_seed(0)
    grad, embeds = (torch.randn(3, 7, 40, generator=gen).to(device) for _ in range(2))
    mask = (torch.rand(3, 7, generator=gen) < 0.6).to(device)
    want = gradient.saliency_reference(grad, embeds, mask)
    assert_verbose_allclose(torch.ops.oar.saliency(grad, embeds, mask), want, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.oar.saliency.default, (grad, embeds, mask))


def test_saliency_triton_kernel_matches_reference():
    device = triton_device_or_skip(gradient.triton)
    gen = torch.Generator().manual_seed(1)
    grad, embeds = (torch.randn(2, 5, 2100, generator=gen).to(device) for _ in range(2))
    mask = (torch.rand(2, 5, generator=gen) < 0.5).to(device)
    got = gradient._saliency_triton(grad, embeds, mask)  # H > one 1024 block: a loop
    assert_verbose_allclose(
        got, gradient.saliency_reference(grad, embeds, mask), rtol=1e-4, atol=1e-4
    )


# ------------------------------------------------------------------------ the pipeline


def _plain_old_logprobs(model, ids, attn):
    """What a GRPO trainer computes anyway: a forward with full logits, log_softmax, gather."""
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=attn.long(), position_ids=position_ids_from(attn)
        ).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    valid = attn[:, 1:] & attn[:, :-1]
    return torch.where(valid, logp, 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_oar_advantages_equals_composing_the_parts(mode):
    model = tiny_model("qwen2")
    ids, attn, score, answer, *_ = ragged_batch(seed=9, left_pad=True)
    per_seq = torch.tensor([1.0, -0.5, 0.25, -2.0])
    out = ok.oar_advantages(
        model,
        ids,
        attn,
        score,
        answer,
        per_seq,
        mode=mode,
        generator=torch.Generator().manual_seed(3),
        tau=0.3,
    )
    noise_std = 0.0 if mode == "answer_joint" else gradient.NOISE_STD
    scores = ok.gradient_importance(
        model,
        ids,
        attn,
        score,
        answer,
        mode=mode,
        noise_std=noise_std,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(out.scores, scores)
    assert torch.equal(out.weights, ok.bilevel_weights(scores, score, tau=0.3))
    assert torch.equal(out.advantages, ok.reshape_advantages(per_seq, scores, score, tau=0.3))
    assert_verbose_allclose(
        out.old_logprobs[:, 1:],
        _plain_old_logprobs(model, ids, attn),
        rtol=1e-4,
        atol=1e-5,
        name="old logprobs",
    )


def test_oar_advantages_rejects_unknown_method_and_bad_advantages():
    model = tiny_model("llama")
    ids, attn, score, answer, *_ = ragged_batch(seed=0, left_pad=False)
    with pytest.raises(ValueError, match="method"):
        ok.oar_advantages(model, ids, attn, score, answer, torch.ones(4), method="saliency")
    with pytest.raises(ValueError, match="mask_token_id"):
        ok.oar_advantages(model, ids, attn, score, answer, torch.ones(4), method="perturbation")
    with pytest.raises(ValueError, match="advantages"):
        ok.oar_advantages(model, ids, attn, score, answer, torch.ones(3))
