"""OAR-P's cheaper variants (stride, segments, the hybrid) against a float64 naive reference:
mask the segment / the selected tokens, recompute the whole row, full logits."""

import pytest
import torch

import oar_kernels as ok
from oar_kernels.importance.variants import (
    FALLBACK_SHARE,
    hybrid_importance,
    step_segments,
    window_segments,
)
from tests.helpers import assert_verbose_allclose, check_bad_call, ragged_rollouts, tiny_causal_lm

MASK_ID = 0


def naive_outcome(model, x, answer, mode):
    positions = answer.nonzero().flatten().tolist()
    row_mode = mode if positions else "last"
    logits = model(input_ids=x[None]).logits[0].double()
    if row_mode == "answer_joint":
        logp = [torch.log_softmax(logits[t - 1], -1)[x[t]] for t in positions]
        return torch.stack(logp).mean(), row_mode
    if row_mode == "answer_mean":
        mean = torch.stack([logits[t - 1] for t in positions]).mean(0)
        return torch.log_softmax(mean, -1), row_mode
    last = positions[0] - 1 if positions else len(x) - 1
    return torch.log_softmax(logits[last], -1), row_mode


@torch.no_grad()
def naive_masked(model, ids, answer, mode, masked: list[int]):
    """Importance of masking the row positions `masked` at once (full recompute)."""
    clean, row_mode = naive_outcome(model, ids, answer, mode)
    x = ids.clone()
    x[masked] = MASK_ID
    counter, _ = naive_outcome(model, x, answer, mode)
    if row_mode == "answer_joint":
        return clean - counter
    return (clean.exp() * (clean - counter)).sum()


def _row_segments(segments_row, score_row):
    """{segment id: [positions]} of a row's scored tokens."""
    groups = {}
    for pos in score_row.nonzero().flatten().tolist():
        groups.setdefault(int(segments_row[pos]), []).append(pos)
    return groups


def _delimited(ids, score):
    """A delimiter id common in the scored spans of ragged_rollouts(seed 13)."""
    return int(ids[score].mode().values)


@pytest.mark.parametrize(
    "mode, left_pad, budget, kind",
    [
        ("last", False, 30, "windows"),
        ("answer_mean", True, 100000, "windows"),
        ("answer_joint", True, 30, "steps"),
        ("last", True, 100000, "steps"),
        ("answer_mean", False, 30, "steps"),
        ("answer_joint", False, 100000, "windows"),
    ],
)
def test_segments_match_naive_masking_of_the_segment(mode, left_pad, budget, kind):
    model = tiny_causal_lm("llama").double()
    ids, attn, score, answer, _, per_row = ragged_rollouts(seed=13, left_pad=left_pad)
    if kind == "windows":
        segments = window_segments(score, 3)
    else:
        segments = step_segments(ids, score, [_delimited(ids, score), 7])
    got = ok.perturbation_importance(
        model,
        ids,
        attn,
        score,
        answer,
        mode=mode,
        mask_token_id=MASK_ID,
        max_batch_tokens=budget,
        segments=segments,
    )
    for r, (row_ids, s, a, _, cols) in enumerate(per_row):
        want = torch.zeros(len(row_ids), dtype=torch.float64)
        for positions in _row_segments(segments[r, cols], s).values():
            want[positions] = naive_masked(model, row_ids, a, mode, positions)
        assert_verbose_allclose(got[r, cols], want, rtol=1e-5, atol=1e-9, name=f"row {r}")
        assert torch.all(got[r][~score[r]] == 0)


def test_non_contiguous_segment_masks_all_its_tokens():
    model = tiny_causal_lm("qwen2").double()
    ids, attn, score, answer, _, per_row = ragged_rollouts(seed=3, left_pad=True)
    segments = torch.where(score, torch.arange(ids.shape[1]) % 2, -1)  # interleaved
    got = ok.perturbation_importance(
        model, ids, attn, score, answer, mask_token_id=MASK_ID, segments=segments
    )
    for r, (row_ids, s, a, _, cols) in enumerate(per_row):
        for positions in _row_segments(segments[r, cols], s).values():
            want = naive_masked(model, row_ids, a, "last", positions)
            assert_verbose_allclose(
                got[r, cols][positions], want.expand(len(positions)), rtol=1e-5, atol=1e-9
            )


@pytest.mark.parametrize(
    "mode, stride", [("last", 2), ("answer_mean", 3), ("answer_joint", 3), ("last", 100)]
)
def test_stride_scores_every_kth_token_exactly_and_fills_from_the_nearest(mode, stride):
    model = tiny_causal_lm("llama").double()
    ids, attn, score, answer, _, per_row = ragged_rollouts(seed=5, left_pad=True)
    got = ok.perturbation_importance(
        model, ids, attn, score, answer, mode=mode, mask_token_id=MASK_ID, stride=stride
    )
    for r, (row_ids, s, a, _, cols) in enumerate(per_row):
        positions = s.nonzero().flatten().tolist()
        kept = positions[::stride]
        exact = {p: naive_masked(model, row_ids, a, mode, [p]) for p in kept}
        want = torch.zeros(len(row_ids), dtype=torch.float64)
        for rank, p in enumerate(positions):
            nearest = min(range(len(kept)), key=lambda i: (abs(i * stride - rank), -i))
            want[p] = exact[kept[nearest]]
        assert_verbose_allclose(got[r, cols], want, rtol=1e-5, atol=1e-9, name=f"row {r}")


def test_width_one_windows_and_stride_one_are_exact_oar_p():
    model = tiny_causal_lm("qwen2")
    ids, attn, score, answer, _, _ = ragged_rollouts(seed=8, left_pad=False)
    args = (model, ids, attn, score, answer)
    exact = ok.perturbation_importance(*args, mode="answer_mean", mask_token_id=MASK_ID)
    for extra in ({"stride": 1}, {"segments": window_segments(score, 1)}):
        got = ok.perturbation_importance(*args, mode="answer_mean", mask_token_id=MASK_ID, **extra)
        assert torch.equal(got, exact), extra


def _suffix_tokens(per_row, starts_of):
    """Token forwards by hand (right padding): the clean forward of every row up to the
    batch's last outcome column W (its last answer token's predictor, or its last token
    without an answer), plus each counterfactual's positions s .. its row's last."""
    lasts = [int(a.nonzero().max()) - 1 if a.any() else len(i) - 1 for i, _, a, *_ in per_row]
    width = max(lasts) + 1
    total = 0
    for (row_ids, s, *_), last in zip(per_row, lasts):
        total += min(len(row_ids), width) + sum(last - start + 1 for start in starts_of(s))
    return total


def test_token_forwards_count_only_the_counterfactuals_run():
    """The cost measure (no dispatch counting): token forwards from the plan, by hand."""
    model = tiny_causal_lm("llama")
    ids, attn, score, answer, _, per_row = ragged_rollouts(seed=1, left_pad=False)
    args = (model, ids, attn, score, answer)

    def forwards(**extra):
        _, stats = ok.perturbation_importance(
            *args, mode="answer_joint", mask_token_id=MASK_ID, return_stats=True, **extra
        )
        return stats.token_forwards

    def positions(s):
        return s.nonzero().flatten().tolist()

    assert forwards() == _suffix_tokens(per_row, positions)
    assert forwards(stride=3) == _suffix_tokens(per_row, lambda s: positions(s)[::3])
    windows = window_segments(score, 4)
    assert forwards(segments=windows) == _suffix_tokens(per_row, lambda s: positions(s)[::4])
    assert forwards(stride=3) < forwards()


@pytest.mark.parametrize("mode, k", [("last", 1), ("answer_mean", 3), ("answer_joint", 3)])
def test_hybrid_scores_the_top_k_exactly_and_the_rest_below(mode, k):
    model = tiny_causal_lm("llama").double()
    ids, attn, score, answer, _, per_row = ragged_rollouts(seed=13, left_pad=True)
    gen = torch.Generator().manual_seed(0)
    got, stats = hybrid_importance(
        model,
        ids,
        attn,
        score,
        answer,
        mode=mode,
        mask_token_id=MASK_ID,
        k=k,
        generator=gen,
        return_stats=True,
    )
    ranking = ok.gradient_importance(
        model, ids, attn, score, answer, mode=mode, generator=torch.Generator().manual_seed(0)
    )
    assert stats.exact_tokens == sum(min(k, int(s.sum())) for _, s, *_ in per_row)
    for r, (row_ids, s, a, _, cols) in enumerate(per_row):
        positions = s.nonzero().flatten().tolist()
        g = ranking[r, cols]
        top = sorted(positions, key=lambda p: (-float(g[p]), p))[:k]
        exact = {p: naive_masked(model, row_ids, a, mode, [p]) for p in top}
        for p in top:
            assert_verbose_allclose(got[r, cols][p], exact[p], rtol=1e-5, atol=1e-9)
        floor = max(min(float(v) for v in exact.values()), 0.0)
        rest = [p for p in positions if p not in top]
        for p in rest:
            value = float(got[r, cols][p])
            assert 0 <= value <= FALLBACK_SHARE * floor * (1 + 1e-6)  # float32 rounding
        if floor > 0 and rest:  # OAR-G's order among the rest is kept
            top_g = max(float(g[p]) for p in rest)
            want = torch.tensor([FALLBACK_SHARE * floor * float(g[p]) / top_g for p in rest])
            assert_verbose_allclose(got[r, cols][rest].double(), want, rtol=1e-5, atol=1e-9)
        assert torch.all(got[r][~score[r]] == 0)


def test_hybrid_with_k_above_every_row_is_exact_oar_p():
    model = tiny_causal_lm("qwen2")
    ids, attn, score, answer, _, _ = ragged_rollouts(seed=4, left_pad=False)
    got = hybrid_importance(model, ids, attn, score, answer, mask_token_id=MASK_ID, k=1000)
    want = ok.perturbation_importance(model, ids, attn, score, answer, mask_token_id=MASK_ID)
    assert torch.equal(got, want)


def test_segment_builders():
    score = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert window_segments(score, 2).tolist() == [
        [-1, 0, 0, 1, 1, 2, -1],
        [0, 0, -1, -1, 1, 1, 2],
    ]
    ids = torch.tensor([[5, 1, 9, 2, 9, 3, 9], [9, 1, 9, 9, 2, 9, 4]])
    assert step_segments(ids, score, [9]).tolist() == [
        [-1, 0, 0, 1, 1, 2, -1],
        [0, 1, -1, -1, 1, 1, 2],
    ]


def _bad_calls():
    model = tiny_causal_lm("llama")
    ids, attn, score, answer, _, _ = ragged_rollouts(seed=0, left_pad=False)
    segments = window_segments(score, 2)

    def call(**kwargs):
        args = dict(mask_token_id=MASK_ID) | kwargs
        return ok.perturbation_importance(model, ids, attn, score, answer, **args)

    def hybrid(**kwargs):
        args = dict(mask_token_id=MASK_ID) | kwargs
        return hybrid_importance(model, ids, attn, score, answer, **args)

    return [
        ("stride-zero", lambda: call(stride=0), ValueError, "stride"),
        ("stride-float", lambda: call(stride=2.0), TypeError, "stride"),
        ("stride-bool", lambda: call(stride=True), TypeError, "stride"),
        ("segments-list", lambda: call(segments=[[0]]), TypeError, "segments"),
        ("segments-float", lambda: call(segments=segments.double()), TypeError, "segments"),
        ("segments-bool", lambda: call(segments=score), TypeError, "segments"),
        ("segments-shape", lambda: call(segments=segments[:, :3]), ValueError, "segments"),
        ("segments-and-stride", lambda: call(segments=segments, stride=2), ValueError, "stride"),
        ("k-zero", lambda: hybrid(k=0), ValueError, "k must"),
        ("k-float", lambda: hybrid(k=3.5), TypeError, "k must"),
        ("hybrid-mask-id", lambda: hybrid(mask_token_id=-1), ValueError, "mask_token_id"),
        ("width-zero", lambda: window_segments(score, 0), ValueError, "width"),
        ("width-mask", lambda: window_segments(score.double(), 2), TypeError, "score_mask"),
        ("delimiters-empty", lambda: step_segments(ids, score, []), TypeError, "delimiter_ids"),
        ("delimiters-neg", lambda: step_segments(ids, score, [-2]), ValueError, "delimiter_ids"),
        ("steps-ids", lambda: step_segments(ids.double(), score, [1]), TypeError, "input_ids"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_arguments_raise_clear_errors(case):
    check_bad_call(case)


def test_oar_advantages_takes_the_variants_and_reshapes_their_scores():
    model = tiny_causal_lm("llama").double()
    ids, attn, score, answer, _, _ = ragged_rollouts(seed=13, left_pad=True)
    batch = (model, ids, attn, score, answer)
    advantages = torch.linspace(-1.0, 1.0, ids.shape[0], dtype=torch.float64)

    def pipeline(**options):
        return ok.oar_advantages(*batch, advantages, mask_token_id=MASK_ID, **options)

    def variant(function, **options):
        return function(*batch, mode="answer_joint", mask_token_id=MASK_ID, **options)

    windows = window_segments(score, 3)
    cases = {
        "stride": (
            dict(method="perturbation", stride=2),
            variant(ok.perturbation_importance, stride=2),
        ),
        "segments": (
            dict(method="perturbation", segments=windows),
            variant(ok.perturbation_importance, segments=windows),
        ),
        "hybrid": (
            dict(method="hybrid", top_k=2, generator=torch.Generator().manual_seed(5)),
            variant(hybrid_importance, k=2, generator=torch.Generator().manual_seed(5)),
        ),
    }
    clean = pipeline(method="perturbation").old_logprobs
    for name, (options, want) in cases.items():
        got = pipeline(**options)
        assert torch.equal(got.scores, want), name
        weights = ok.bilevel_weights(want, score)
        assert torch.equal(got.weights, weights), name
        assert_verbose_allclose(
            got.advantages, advantages[:, None].float() * weights, rtol=1e-6, atol=1e-7
        )
        assert torch.equal(got.old_logprobs, clean), name
    top_1, top_3 = (pipeline(method="hybrid", top_k=k).scores for k in (1, 3))
    assert not torch.equal(top_1, top_3)  # top_k reaches the hybrid


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(method="gradient", stride=2), "stride with method='perturbation' only"),
        (dict(method="hybrid", segments="windows"), "segments with method='perturbation'"),
        (dict(method="perturbation", top_k=4), "top_k with method='hybrid' only"),
        (dict(method="hybrid", mask_token_id=None), "method='hybrid' needs mask_token_id"),
        (dict(method="hybrid", max_batch_tokens=64), "max_batch_tokens must be None"),
    ],
)
def test_oar_advantages_refuses_variant_options_of_another_method(options, match):
    model = tiny_causal_lm("llama")
    ids, attn, score, answer, _, _ = ragged_rollouts(seed=13, left_pad=True)
    if options.get("segments") == "windows":
        options["segments"] = window_segments(score, 3)
    options = {"mask_token_id": MASK_ID, **options}
    with pytest.raises(ValueError, match=match):
        ok.oar_advantages(model, ids, attn, score, answer, torch.ones(ids.shape[0]), **options)
