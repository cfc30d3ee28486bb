"""When a run has collapsed: the protocol's reason to disqualify a tuning trial, and the
report's reason to name a table run.

A curve collapsed when its training diverged (the run recorded a `diverged_round`), when it
never left chance (its best round at most chance + `LEARNT`), or when it fell back: the mean of
its last `LAST` rounds kept less than `KEPT` of what its best `LAST`-round mean had gained over
chance. Both means span the same window, so a curve still rising (its last window its best) has
not fallen, however steep; a single bad round moves a window's mean by a fifth of its drop. The
rule looks at a whole curve, so it applies at the end of every rung of the tuning and of the
re-check at full length, and it needs no threshold tuned to a setting: chance is 1 / classes
and the rest are shares of the curve's own gain.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedhpro_lab import stats

LEARNT = 0.05  # a best accuracy at most this far above chance: the run never learnt
KEPT = 0.5  # share of its best window's gain over chance that the last window must keep
LAST = 5  # rounds in a window
TOLERANCE = 1e-9  # below accuracy's resolution: 0.1 + 0.05 is 0.15, not 0.15000000000000002


def collapse(accuracies: Sequence[float], num_classes: int,
             diverged_round: int | None = None) -> str | None:
    """Why the curve collapsed, in words for a report, or None if it did not (NaN rounds are
    left out)."""
    if diverged_round is not None:
        return f"training diverged in round {diverged_round}"
    finite = [a for a in accuracies if a == a]
    if not finite:
        return "no round scored"
    chance = 1.0 / num_classes
    best = max(finite)
    if best - chance <= LEARNT + TOLERANCE:
        return f"never left chance (best {best:.3f}, chance {chance:.3f})"
    width = min(LAST, len(finite))
    windows = [stats.mean(finite[i:i + width]) for i in range(len(finite) - width + 1)]
    peak, end = max(windows), windows[-1]
    if end - chance < KEPT * (peak - chance) - TOLERANCE:
        return f"its {width}-round mean fell from {peak:.3f} to {end:.3f}"
    return None
