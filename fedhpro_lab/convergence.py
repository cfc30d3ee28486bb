"""When a setting's curves have flattened: how long the protocol's tables run, and the check
its report prints.

The rule (issue #18): the baseline's accuracy curve, smoothed over 5 rounds, moved less than
`CONVERGED_POINTS` over the last 10 rounds: its validation curve on the tuning's re-check seed
decides the table's length (`tuning.Tuning.check_at_length`), the mean of its test curves over
the table's seeds is the report's check. The baseline is FedAvg, or FedProto where FedAvg does
not run (heterogeneous backbones share no weights).
"""

from __future__ import annotations

from typing import Any

from fedhpro_lab import stats

CONVERGED_POINTS = 0.5  # largest change of the 5-round mean over the last 10 rounds, in points
WINDOW, SPAN = 5, 10
EXTEND_BY = 10  # rounds a table grows by while its baseline has not flattened
MAX_ROUNDS = 80  # where it stops growing, flattened or not (the report says which)


def baseline(methods: tuple[str, ...] | list[str]) -> str:
    """The method whose curve decides a setting's length: FedAvg, else FedProto, else the
    first one named."""
    return next((m for m in ("fedavg", "fedproto") if m in methods), methods[0])


def mean_curve(runs: list[list[dict[str, Any]]]) -> list[float]:
    """Accuracy per round, averaged over the runs (seeds), as long as the shortest run."""
    length = min(len(run) for run in runs)
    return [stats.mean([run[i]["accuracy"] for run in runs]) for i in range(length)]


def moving_change(accuracies: list[float], window: int = WINDOW, span: int = SPAN) -> float:
    """How much the mean of the last `window` rounds moved over the last `span` rounds."""
    now = stats.mean(accuracies[-window:])
    before = stats.mean(accuracies[-window - span:-span])
    return now - before


def checkable(curve: list[float]) -> bool:
    return len(curve) >= WINDOW + SPAN


def flattened(curve: list[float]) -> bool:
    """Whether the curve meets the rule (a curve too short to tell has not)."""
    return checkable(curve) and abs(100 * moving_change(curve)) < CONVERGED_POINTS
