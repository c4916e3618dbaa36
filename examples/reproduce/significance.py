"""Mean, standard deviation and the paired t-test over mixture seeds (no SciPy needed).

Runs of different arms with the same seed share their data order and router seed, so a comparison
of two arms is a paired t-test on the per-seed differences (two-sided, n - 1 degrees of freedom).
With three seeds the test has little power: a p-value above 0.05 says "not shown", not "equal".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            last = d * c
        if abs(last - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class Paired:
    """A paired comparison of arm A against arm B (per-seed differences A - B)."""

    mean_diff: float
    std_diff: float
    t: float
    df: int
    p: float
    a_lower: int  # seeds where A < B
    n: int

    def sentence(self, a: str, b: str, unit: str = "perplexity") -> str:
        """One line: the difference, the test and its verdict at the 5% level."""
        verdict = "significant at 5%" if self.p < 0.05 else "not significant at 5%"
        lower = a if self.mean_diff < 0 else b
        return (
            f"{a} − {b}: {self.mean_diff:+.2f} ± {self.std_diff:.2f} {unit} (paired t-test over {self.n} seeds, "
            f"t({self.df}) = {self.t:.2f}, p = {self.p:.3f}, {verdict}); {lower} lower on average, "
            f"{a} lower in {self.a_lower}/{self.n} seeds"
        )


def paired_test(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Two-sided paired t-test of ``a`` against ``b`` (same seeds, same order)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired test needs two equal-length samples of at least 2, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(diffs)
    n = len(diffs)
    if std == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(n))
    return Paired(mean, std, t, n - 1, t_two_sided_p(t, n - 1), sum(d < 0 for d in diffs), n)


def one_sample_test(values: Sequence[float], reference: float) -> Paired:
    """Two-sided one-sample t-test of ``values`` against a single run's ``reference`` (e.g. the dense seed)."""
    return paired_test(values, [reference] * len(values))
