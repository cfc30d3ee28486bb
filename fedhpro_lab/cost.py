"""What a protocol will cost, said before it starts: runs, rounds, and hours on this machine
from a short measured probe.

The probe runs every method of every setting for `PROBE_ROUNDS` rounds on the tuning seed
(one engine start-up a setting) into `probe/` and keeps, in probe.json, each method's seconds
for a round after the first and the setting's start-up seconds; a resumed protocol reads them
back. The plan's rounds follow the tuning's arithmetic: every trial's first rung, the
finalists' second, one re-check a method at the table's length, and the table's tuned and
published seeds at that length. The length lies between the setting's least length and its
cap, so the estimate is a range; a method whose first candidate collapses is re-checked again,
which the range leaves out (at most `tuning.RECHECKS` a method).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedhpro_lab import convergence, stats
from fedhpro_lab.benchmark import read_results, read_rows
from fedhpro_lab.plan import Budget, ProtocolSetting
from fedhpro_lab.suites import Suite, run_path
from fedhpro_lab.tuning import FINALISTS, RUNGS, RunSuite, rung_rounds, with_validation

PROBE_ROUNDS = 2
PROBE = "probe.json"


@dataclass(frozen=True)
class Measured:
    """One setting's probe: a round's seconds by method, and an engine start-up's."""

    round_seconds: dict[str, float]
    startup_seconds: float


def probe(entries: tuple[ProtocolSetting, ...], out: Path, run_suite: RunSuite, seed: int,
          overrides: str, timeout: float | None = None) -> dict[str, Measured]:
    """Each setting's probe, run where probe.json does not hold it yet."""
    path = out / PROBE
    held = json.loads(path.read_text()) if path.is_file() else {}
    folder = out / "probe"
    for entry in entries:
        name = entry.setting.name
        if name in held and set(entry.methods) <= set(held[name]["round_seconds"]):
            continue
        suite = Suite("probe", f"probe of {name}", (with_validation(entry.setting),),
                      entry.methods, (seed,),
                      PROBE_ROUNDS, overrides=overrides)
        print(f"protocol: measuring a round of each method on {name} ({PROBE_ROUNDS} rounds "
              f"each, for the cost estimate)", flush=True)
        run_suite(suite, folder, timeout)
        held[name] = measured(folder, name, entry.methods, seed)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(held, indent=2))
    return {name: Measured(**held[name]) for name in (e.setting.name for e in entries)}


def measured(folder: Path, setting: str, methods: tuple[str, ...], seed: int) -> dict:
    """A round's wall seconds after the first, by method (the first round also pays the
    engine's start-up), and the start-up: the group's time less every round's."""
    rows = read_rows(folder / "results.csv")
    seconds, group, rounds_total = {}, 0.0, 0.0
    for method in methods:
        results = read_results(run_path(folder, setting, method, seed) / "results.json")
        if results is None or not results["rounds"]:
            raise RuntimeError(f"the cost probe of {method} on {setting} did not run a round "
                               f"(its reason: {folder / 'results.csv'})")
        walls = [r["wall_seconds"] for r in results["rounds"]]
        seconds[method] = stats.mean(walls[1:] or walls)
        rounds_total += sum(walls)
        run_seconds = float(rows.get((setting, method, str(seed)), {}).get("run_seconds")
                            or "nan")
        group += run_seconds if run_seconds == run_seconds else sum(walls)
    return {"round_seconds": seconds, "startup_seconds": max(group - rounds_total, 0.0)}


def method_rounds(entry: ProtocolSetting, budget: Budget, length: int) -> tuple[int, int]:
    """(runs, rounds) of one method in one setting when the table runs `length` rounds."""
    first, second = (rung_rounds(entry.rounds, share) for share in RUNGS)
    finalists = min(FINALISTS, budget.trials)
    tables = len(budget.seeds) + len(budget.published_seeds)
    runs = budget.trials + 1 + tables
    rounds = budget.trials * first + finalists * (second - first) + length * (1 + tables)
    return runs, rounds


def engine_starts(entry: ProtocolSetting, budget: Budget, length: int) -> int:
    """Simulation engine start-ups of one setting: one a rung, the baseline's re-check and
    each of its growth steps, the others' re-checks, one a table seed."""
    growth = -(-(length - entry.rounds) // convergence.EXTEND_BY)
    rechecks = 1 + growth + (len(entry.methods) > 1)
    return len(RUNGS) + rechecks + len(budget.seeds) + len(budget.published_seeds)


def estimate(entries: tuple[ProtocolSetting, ...], budget: Budget,
             probes: dict[str, Measured]) -> list[str]:
    """The plan's cost, a line a setting and the total, each at the least length and at the
    cap."""
    lines, runs_all = [], 0
    rounds_all, hours_all = [0, 0], [0.0, 0.0]
    for entry in entries:
        measured_here = probes[entry.setting.name]
        lengths = (entry.rounds, max(entry.cap, entry.rounds) if entry.grow else entry.rounds)
        rounds, hours = [0, 0], [0.0, 0.0]
        for i, length in enumerate(lengths):
            seconds = engine_starts(entry, budget, length) * measured_here.startup_seconds
            for method in entry.methods:
                planned = method_rounds(entry, budget, length)[1]
                rounds[i] += planned
                seconds += planned * measured_here.round_seconds[method]
            hours[i] = seconds / 3600
        runs = len(entry.methods) * method_rounds(entry, budget, entry.rounds)[0]
        runs_all += runs
        rounds_all = [a + b for a, b in zip(rounds_all, rounds, strict=True)]
        hours_all = [a + b for a, b in zip(hours_all, hours, strict=True)]
        span = _range(list(lengths), "{}")
        lines.append(f"  {entry.setting.name}: {len(entry.methods)} methods x {budget.trials} "
                     f"trials, the table {span} rounds on {len(budget.seeds)} + "
                     f"{len(budget.published_seeds)} seeds: {runs} runs, "
                     f"{_range(rounds, '{:,}')} rounds, {_range(hours, '{:.2f}')} h")
    return [f"protocol: what it will cost on this machine (from a {PROBE_ROUNDS}-round probe "
            f"of every method; more if a re-check collapses and the next candidate runs):",
            *lines, f"  in all: {runs_all} runs, {_range(rounds_all, '{:,}')} rounds, "
                    f"{_range(hours_all, '{:.2f}')} hours"]


def _range(values: list, fmt: str) -> str:
    low, high = (fmt.format(v) for v in values)
    return low if low == high else f"{low}-{high}"
