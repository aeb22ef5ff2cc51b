"""OAR-P against the naive method: R full forwards with full logits per row (SPEC section 4)."""

import pytest
import torch

import oar_kernels as ok
from oar_kernels.importance.batch import MODES
from tests.helpers import (
    assert_verbose_allclose,
    check_bad_call,
    ragged_rollouts,
    tiny_causal_lm,
)

MASK_ID = 0


def naive_importance(model, ids, score, answer, mode):
    """One full forward with full logits per counterfactual, one row at a time, float64."""
    positions = answer.nonzero().flatten().tolist()
    row_mode = mode if positions else "last"

    def outcome(x):
        logits = model(input_ids=x[None]).logits[0].double()
        if row_mode == "answer_joint":
            return torch.stack(
                [torch.log_softmax(logits[t - 1], -1)[x[t]] for t in positions]
            ).mean()
        if row_mode == "answer_mean":
            return torch.log_softmax(torch.stack([logits[t - 1] for t in positions]).mean(0), -1)
        return torch.log_softmax(logits[positions[0] - 1 if positions else len(x) - 1], -1)

    out = torch.zeros(len(ids), dtype=torch.float64)
    with torch.no_grad():
        clean = outcome(ids)
        for s in score.nonzero().flatten().tolist():
            masked = ids.clone()
            masked[s] = MASK_ID
            counter = outcome(masked)
            out[s] = (
                clean - counter
                if row_mode == "answer_joint"
                else (clean.exp() * (clean - counter)).sum()
            )
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("left_pad", [False, True], ids=["right-pad", "left-pad"])
@pytest.mark.parametrize("budget", [30, 100000], ids=["micro-batched", "one-batch"])
def test_matches_naive_full_forwards(kind, mode, left_pad, budget):
    model = tiny_causal_lm(kind).double()
    ids, attn, score, answer, _, per_row = ragged_rollouts(seed=13, left_pad=left_pad)
    got = ok.perturbation_importance(
        model, ids, attn, score, answer, mode=mode, mask_token_id=MASK_ID, max_batch_tokens=budget
    )
    for r, (row_ids, s, a, _, cols) in enumerate(per_row):
        want = naive_importance(model, row_ids, s, a, mode)
        assert_verbose_allclose(got[r, cols], want, rtol=1e-5, atol=1e-9, name=f"row {r}")
        assert torch.all(got[r][~score[r]] == 0)


def test_float32_model_matches_naive_in_float32():
    model = tiny_causal_lm("llama")
    ids, attn, score, answer, _, per_row = ragged_rollouts(seed=2, left_pad=True)
    got = ok.perturbation_importance(
        model, ids, attn, score, answer, mode="answer_joint", mask_token_id=MASK_ID
    )
    for r, (row_ids, s, a, _, cols) in enumerate(per_row):
        want = naive_importance(model, row_ids, s, a, "answer_joint")
        assert_verbose_allclose(got[r, cols], want, rtol=1e-3, atol=1e-5, name=f"row {r}")


def test_work_done_is_less_than_naive_and_reported():
    model = tiny_causal_lm("llama")
    ids, attn, score, answer, _, _ = ragged_rollouts(seed=1, left_pad=False)
    _, stats = ok.perturbation_importance(
        model, ids, attn, score, answer, mask_token_id=MASK_ID, return_stats=True
    )
    rows = [(int(score[r].sum()), int(attn[r].sum())) for r in range(ids.shape[0])]
    assert stats.naive_token_forwards == sum(scored * length for scored, length in rows)
    assert stats.token_forwards < stats.naive_token_forwards


def _bad_calls():
    model = tiny_causal_lm("llama")
    ids, attn, score, answer, _, _ = ragged_rollouts(seed=0, left_pad=False)
    defaults = dict(
        model=model,
        input_ids=ids,
        attention_mask=attn,
        score_mask=score,
        answer_mask=answer,
        mask_token_id=MASK_ID,
    )

    def call(**overrides):
        return ok.perturbation_importance(**{**defaults, **overrides})

    return [
        ("mask-id-range", lambda: call(mask_token_id=10_000), ValueError, "mask_token_id"),
        ("mask-id-type", lambda: call(mask_token_id=1.0), TypeError, "mask_token_id"),
        ("mask-id-negative", lambda: call(mask_token_id=-1), ValueError, "mask_token_id"),
        ("mask-id-bool", lambda: call(mask_token_id=False), TypeError, "mask_token_id"),
        ("stats-type", lambda: call(return_stats=1), TypeError, "return_stats"),
        ("budget", lambda: call(max_batch_tokens=0), ValueError, "max_batch_tokens"),
        ("mode", lambda: call(mode="kl"), ValueError, "mode"),
        ("score-shape", lambda: call(score_mask=score[:, :3]), ValueError, "score_mask"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    check_bad_call(case)


def test_oar_advantages_with_perturbation_equals_composing_the_parts():
    model = tiny_causal_lm("qwen2")
    ids, attn, score, answer, _, _ = ragged_rollouts(seed=6, left_pad=True)
    per_seq = torch.tensor([1.0, -1.0, 0.5, 2.0])
    out = ok.oar_advantages(
        model,
        ids,
        attn,
        score,
        answer,
        per_seq,
        method="perturbation",
        mode="last",
        mask_token_id=MASK_ID,
    )
    scores = ok.perturbation_importance(
        model, ids, attn, score, answer, mode="last", mask_token_id=MASK_ID
    )
    assert torch.equal(out.scores, scores)
    assert torch.equal(out.advantages, ok.reshape_advantages(per_seq, scores, score))
    gradient_run = ok.oar_advantages(model, ids, attn, score, answer, per_seq)
    assert_verbose_allclose(out.old_logprobs, gradient_run.old_logprobs, rtol=1e-5, atol=1e-6)
