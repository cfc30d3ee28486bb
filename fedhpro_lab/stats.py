"""Statistics over seeds, one definition for every report.

"std over seeds" is the sample standard deviation (ddof = 1, Bessel's correction): the seeds
are a sample of the runs a method could give, and the interval below builds on the same
estimate. Intervals are Student t intervals for the mean; paired differences compare two
methods run on the same seeds (same partitions and initial weights), seed by seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence

from scipy.stats import t as student_t

STD_LABEL = "sample std over seeds, ddof = 1"  # what a report's "±" says


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; at least one value."""
    values = list(values)
    if not values:
        raise ValueError("the mean of no values")
    return statistics.fmean(values)


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1); 0 for a single value, which has no spread to
    estimate (a report then shows the value alone)."""
    if not values:
        raise ValueError("the std of no values")
    if len(values) == 1:
        return 0.0
    centre = mean(values)  # NaN in, NaN out (statistics.stdev raises on a NaN)
    return math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided Student t interval for the mean: mean ± t_{(1+level)/2, n-1} · std / sqrt(n).

    Needs two values at least (one says nothing about the spread)."""
    if len(values) < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {len(values)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(values)
    half = float(student_t.ppf((1.0 + level) / 2.0, n - 1)) * std(values) / math.sqrt(n)
    centre = mean(values)
    return centre - half, centre + half


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a[i] - b[i]`` for runs paired by seed (same order); lengths must agree."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    return [x - y for x, y in zip(a, b, strict=True)]


VERDICT_LETTER = {"win": "W", "tie": "T", "loss": "L"}  # a table's column of verdicts


def verdict(differences: Sequence[float], level: float = 0.95) -> str:
    """"win" when the `level` interval of the mean paired difference lies above 0, "loss"
    when below, else "tie"; a single pair is never enough to call."""
    if len(differences) < 2:
        return "tie"
    low, high = t_interval(differences, level)
    return "win" if low > 0 else "loss" if high < 0 else "tie"


def interval_text(values: Sequence[float], points: bool = False) -> str:
    """"mean [low, high]" of the 95% t interval, to 3 decimals, or in points (x 100, to 1
    decimal) for differences of accuracies; a single value has no interval: "value [—]"."""
    scale, digits = (100, 1) if points else (1, 3)
    if len(values) < 2:
        return f"{mean(values) * scale:.{digits}f} [—]"
    low, high = t_interval(values)
    return (f"{mean(values) * scale:.{digits}f} "
            f"[{low * scale:.{digits}f}, {high * scale:.{digits}f}]")


def paired_text(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[str, str]:
    """`a` minus `b` over the seeds both ran, as a table's two cells: the difference in points
    with its 95% interval, and its verdict letter; "—" for both under two common seeds."""
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return "—", "—"
    diffs = paired_differences([a[s] for s in common], [b[s] for s in common])
    return interval_text(diffs, points=True), VERDICT_LETTER[verdict(diffs)]
