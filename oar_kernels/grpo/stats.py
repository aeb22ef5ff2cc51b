"""The study's statistics (docs/study/DESIGN.md): the primary metric, paired differences
with a t interval and an exact sign-flip p-value, and the seed count for a target power.

Plain Python on lists of floats (no SciPy): a study has a few dozen numbers.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

# t quantiles at 0.975 for 1..30 degrees of freedom (SciPy's t.ppf, 4 decimals).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
Z975, Z80 = 1.959964, 0.841621  # standard normal quantiles at 0.975 and 0.8
MAX_EXACT = 20  # sign flips enumerated exactly up to this many pairs (2^20 patterns)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z975  # Cornish-Fisher expansion: within 1e-4 of the exact value above 30
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def auc(points: list[tuple[int, float]]) -> float:
    """The primary metric: the mean held-out pass@1 over the eval points after step 0.

    points: (step, pass@1) pairs of one run; step 0 (the warm start, the same for every arm)
    is left out.
    """
    later = [value for step, value in points if step > 0]
    if not later:
        raise ValueError("auc needs an eval point after step 0")
    return statistics.fmean(later)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # 95% t interval
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def mean_ci(values: list[float]) -> Interval:
    """The mean with its 95% t interval (a zero-width one for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = statistics.fmean(values)
    half = t975(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else 0.0
    return Interval(mean, mean - half, mean + half, n)


def sign_flip_p(differences: list[float]) -> float:
    """Two-sided exact sign-flip (paired permutation) p-value of the mean difference: the
    share of the 2^n sign patterns whose |mean| is at least the observed one.

    The smallest p it can give is 2 / 2^n: 0.0625 for 5 pairs, 0.031 for 6.
    """
    n = len(differences)
    if n == 0:
        raise ValueError("sign_flip_p needs at least one difference")
    if n > MAX_EXACT:
        raise ValueError(f"exact sign flips enumerate 2^n patterns; n = {n} > {MAX_EXACT}")
    observed = abs(sum(differences)) - 1e-12 * (1 + sum(map(abs, differences)))
    extreme = sum(
        abs(sum(s * d for s, d in zip(signs, differences))) >= observed
        for signs in itertools.product((1, -1), repeat=n)
    )
    return extreme / 2**n


@dataclass(frozen=True)
class Paired:
    difference: Interval  # of arm - baseline, per seed
    p: float  # exact sign-flip
    better: int  # seeds where the arm is above the baseline
    d_z: float  # mean difference / sd of differences (0 when the sd is 0)


def paired(arm: list[float], baseline: list[float]) -> Paired:
    """Per-seed paired comparison of `arm` with `baseline` (same seeds, same order)."""
    if len(arm) != len(baseline):
        raise ValueError(f"paired needs equal lengths, got {len(arm)} and {len(baseline)}")
    diffs = [a - b for a, b in zip(arm, baseline)]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return Paired(
        mean_ci(diffs),
        sign_flip_p(diffs),
        sum(d > 0 for d in diffs),
        statistics.fmean(diffs) / sd if sd > 0 else 0.0,
    )


def seeds_for_power(d_z: float, *, minimum: int = 6, maximum: int = 20) -> int:
    """Seeds for 80% power of a two-sided 5% paired test at effect size d_z (normal
    approximation with Guenther's small-sample term: d_z = 1 gives 10, d_z = 3 gives 3),
    clipped to [minimum, maximum]; `minimum` 6 is the fewest pairs with which the
    sign-flip test can reach p < 0.05."""
    if d_z == 0:
        return maximum
    n = math.ceil(((Z975 + Z80) / abs(d_z)) ** 2 + Z975**2 / 2)
    return max(minimum, min(maximum, n))


def holm(p_values: list[float], family: int | None = None) -> list[float]:
    """Holm-adjusted p-values, in the order given. `family` (>= len(p_values), default
    len) is the number of hypotheses in the declared family: those not tested count as
    tested with p = 1, which leaves the others' adjustment as conservative as planned."""
    m = len(p_values) if family is None else family
    if m < len(p_values):
        raise ValueError(f"family must be >= the {len(p_values)} p-values, got {family}")
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
