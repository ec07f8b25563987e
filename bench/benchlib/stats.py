"""Statistics of paired repeats: ratios, quartiles and the distribution-free CI of a median."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-repeat ratios a[i] / b[i] of two variants timed next to each other."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    return [p / q for p, q in zip(a, b)]


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of xs (the lower/upper halves' medians; all three equal for one)."""
    xs = sorted(xs)
    n = len(xs)
    if n == 1:
        return xs[0], xs[0], xs[0]
    half = n // 2
    return statistics.median(xs[:half]), statistics.median(xs), statistics.median(xs[-half:])


def median_ci(xs: Sequence[float], conf: float = 0.95) -> tuple[float, float, float]:
    """(lo, hi, coverage): the distribution-free confidence interval of the median of xs, the
    j-th smallest and j-th largest value for the largest j whose coverage
    1 - 2 P(Binomial(n, 1/2) < j) is at least ``conf`` (the full range, with its smaller
    coverage, when n is too small for ``conf``)."""
    xs = sorted(xs)
    n = len(xs)

    def cover(j: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) * 0.5**n

    j = 1
    while j + 1 <= (n + 1) // 2 and cover(j + 1) >= conf:
        j += 1
    return xs[j - 1], xs[n - j], cover(j)


def paired_summary(a: Sequence[float], b: Sequence[float]) -> dict:
    """Median of the per-repeat ratios a/b with its 95 % CI and the CI's coverage."""
    r = paired_ratios(a, b)
    lo, hi, cov = median_ci(r)
    return {"median": statistics.median(r), "ci": [lo, hi], "coverage": cov}


def mem_ratio(peak: int | None, ref: int | None) -> float | None:
    """Peak over the reference's peak (None: not measured, --no-memory)."""
    if peak is None or ref is None:
        return None
    return peak / ref if ref > 0 else float("nan")
