"""Statistics over seeds, one definition for every report.

`std` is the sample standard deviation (n - 1); intervals are Student-t intervals for the mean
over seeds; paired differences pair runs of the same seed (same partitions and initial
weights), so a method's seed-to-seed luck cancels out of a comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import t as student_t


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator); 0 for a single value."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The Student-t confidence interval of the mean; (mean, mean) for a single value."""
    m = mean(values)
    if len(values) < 2:
        return m, m
    half = student_t.ppf((1 + level) / 2, len(values) - 1) * std(values) / math.sqrt(len(values))
    return m - half, m + half


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a_i - b_i for runs paired by seed."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    return [x - y for x, y in zip(a, b, strict=True)]


def verdict(differences: Sequence[float], level: float = 0.95) -> str:
    """"win" when the interval of the mean difference lies above 0, "loss" below, else
    "tie" (a single pair is never enough to call)."""
    low, high = t_interval(differences, level)
    if len(differences) < 2:
        return "tie"
    return "win" if low > 0 else "loss" if high < 0 else "tie"
