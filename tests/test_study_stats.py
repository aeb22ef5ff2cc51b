"""The study's statistics on inputs with known answers."""

import itertools
import statistics

import pytest

from oar_kernels.grpo import stats


def test_t_quantiles_match_known_values():
    assert stats.t975(1) == pytest.approx(12.706, abs=1e-3)
    assert stats.t975(2) == pytest.approx(4.303, abs=1e-3)
    assert stats.t975(9) == pytest.approx(2.262, abs=1e-3)
    assert stats.t975(40) == pytest.approx(2.0211, abs=1e-3)  # past the table
    assert stats.t975(120) == pytest.approx(1.9799, abs=1e-3)
    with pytest.raises(ValueError):
        stats.t975(0)


def test_mean_ci_on_a_known_sample():
    ci = stats.mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2) = 4.3027
    assert ci.mean == 2.0 and ci.n == 3
    assert (ci.low, ci.high) == pytest.approx((2 - 4.3027 / 3**0.5, 2 + 4.3027 / 3**0.5))
    assert stats.mean_ci([0.5]).low == stats.mean_ci([0.5]).high == 0.5


def test_sign_flip_p_exact_values():
    assert stats.sign_flip_p([1.0] * 5) == 2 / 32  # only all-plus and all-minus as extreme
    assert stats.sign_flip_p([1.0] * 6) == 2 / 64
    assert stats.sign_flip_p([0.0, 0.0]) == 1.0
    # [3, -1, 2]: |sum| = 4; patterns with |sum| >= 4: (+,+,+)=4, (+,-,+)=6 and negatives
    assert stats.sign_flip_p([3.0, -1.0, 2.0]) == 4 / 8


def test_sign_flip_p_against_brute_force():
    diffs = [0.03, -0.01, 0.02, 0.05, -0.02, 0.01, 0.04]
    observed = abs(sum(diffs))
    count = sum(
        abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-12
        for signs in itertools.product((1, -1), repeat=len(diffs))
    )
    assert stats.sign_flip_p(diffs) == count / 2 ** len(diffs)


def test_paired_on_known_inputs():
    arm, base = [0.6, 0.7, 0.8, 0.65], [0.5, 0.6, 0.6, 0.7]
    result = stats.paired(arm, base)
    diffs = [0.1, 0.1, 0.2, -0.05]
    assert result.difference.mean == pytest.approx(statistics.fmean(diffs))
    assert result.better == 3
    assert result.d_z == pytest.approx(statistics.fmean(diffs) / statistics.stdev(diffs))
    assert result.p == stats.sign_flip_p([a - b for a, b in zip(arm, base)])
    with pytest.raises(ValueError):
        stats.paired([1.0], [1.0, 2.0])


def test_auc_leaves_out_the_warm_start():
    assert stats.auc([(0, 0.5), (10, 0.6), (20, 0.7), (30, 0.8)]) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        stats.auc([(0, 0.5)])


def test_seeds_for_power_matches_the_usual_figures():
    assert stats.seeds_for_power(1.0) == 10
    assert stats.seeds_for_power(3.0, minimum=1) == 3
    assert stats.seeds_for_power(3.0) == 6  # the sign-flip test's floor
    assert stats.seeds_for_power(0.1) == 20 and stats.seeds_for_power(0.0) == 20


def test_holm_on_known_values():
    # sorted 0.01, 0.02, 0.04 of a family of 3: 0.03, 0.04, 0.04 (monotone)
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # a declared family of 4 with two tested: multipliers 4 and 3
    assert stats.holm([0.2, 0.01], family=4) == pytest.approx([0.6, 0.04])
    assert stats.holm([0.5, 0.6], family=4) == [1.0, 1.0]
    with pytest.raises(ValueError, match="family must be"):
        stats.holm([0.1, 0.2, 0.3], family=2)
