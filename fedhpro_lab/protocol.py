"""The comparison protocol of DESIGN.md, end to end: `fedhpro-bench --protocol --out DIR`.

1. Tuning (`tuning`): every method, every setting, the same budget, scored on a validation
   share of the training pool, on a seed of its own (`TUNING_SEED`), never seen again.
2. The table: each method as tuned on `SEEDS` (every setting), then as published on
   `PUBLISHED_SEEDS`, with the validation share still held out (the clients see the same data as
   in tuning). A setting's table runs until its baseline (FedAvg) has converged
   (`table_length`, `convergence`).
3. RESULTS.md (`protocol_report`): mean of the last 5 rounds with 95% intervals, paired
   differences against FedHPro with win / tie / loss, rounds and megabytes to a target, the
   convergence check, the per-seed curves.

Every step resumes where it stopped: finished runs are kept, a half-done one continues from
its checkpoint, a finished tuning is read back from trials.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhpro_lab import convergence
from fedhpro_lab.benchmark import read_results, scored_rounds
from fedhpro_lab.suites import (
    ALL_STRATEGIES,
    PERSONAL,
    Setting,
    Suite,
    Variant,
    run_path,
    select_named,
)
from fedhpro_lab.tuning import PUBLISHED, VALIDATION, Tuning, read_chosen, write_chosen

TUNING_SEED = 100
SEEDS = (0, 1, 2, 3, 4)
PUBLISHED_SEEDS = (0, 1, 2)  # the published recipes are context, not the comparison
# every setting, every run; the server evaluates on both cores while the clients wait
COMMON = "train.local_epochs=2 federation.server_threads=2"


@dataclass(frozen=True)
class ProtocolSetting:
    setting: Setting
    rounds: int  # the table's least length; `table_length` extends it until converged
    methods: tuple[str, ...]


SETTINGS = (
    ProtocolSetting(Setting("digits-offline", "conf/default.yaml"), 30, ALL_STRATEGIES),
    ProtocolSetting(Setting("mnist-dir0.1", "conf/mnist-dir0.1.yaml"), 30, ALL_STRATEGIES),
    ProtocolSetting(Setting("mnist-dir0.5", "conf/mnist-dir0.5.yaml"), 30, ALL_STRATEGIES),
    ProtocolSetting(Setting("mnist-lt", "conf/mnist-lt.yaml"), 30, ALL_STRATEGIES),
    ProtocolSetting(Setting("hetero", "conf/hetero.yaml"), 30, PERSONAL),
)


def select_settings(names: str) -> tuple[ProtocolSetting, ...]:
    """The protocol's settings named in a comma-separated list, in the protocol's order (all
    when empty): one table can be taken first, the same runs as in the full protocol."""
    return select_named(SETTINGS, names, lambda e: e.setting.name, "protocol setting")


def published_name(method: str) -> str:
    return f"{method}-published"


LENGTHS = "table-rounds.json"  # each setting's table length once `table_length` has begun it


def table_suites(entry: ProtocolSetting, chosen: dict[str, str],
                 rounds: int) -> tuple[Suite, Suite]:
    """The setting's final runs: every method as tuned (named as the method) on `SEEDS`, and
    as published on `PUBLISHED_SEEDS`, `rounds` long."""
    setting = Setting(entry.setting.name, entry.setting.config,
                      f"{entry.setting.overrides} {VALIDATION}".strip())
    tuned = tuple(Variant(m, m, chosen[m]) for m in entry.methods)
    published = tuple(Variant(published_name(m), m, PUBLISHED[m]) for m in entry.methods)
    return (Suite("protocol", f"{entry.setting.name}: the tuned recipes", (setting,), tuned,
                  SEEDS, rounds, overrides=COMMON),
            Suite("protocol", f"{entry.setting.name}: the published recipes", (setting,),
                  published, PUBLISHED_SEEDS, rounds, overrides=COMMON))


def table_length(entry: ProtocolSetting, chosen: dict[str, str], out: Path,
                 run_suite: Callable[..., Path], timeout: float | None = None) -> int:
    """How long the setting's table runs: `entry.rounds`, then `convergence.EXTEND_BY` more
    at a time until the baseline's tuned curve, averaged over `SEEDS`, has flattened
    (`convergence.MAX_ROUNDS` at most). Only the baseline runs here, and its runs are the
    table's own, each continued from its checkpoint. The length reached is kept in
    `LENGTHS`, so that a resumed protocol starts from it."""
    path = out / LENGTHS
    lengths: dict[str, int] = json.loads(path.read_text()) if path.is_file() else {}
    name, lead = entry.setting.name, convergence.baseline(entry.methods)
    rounds = max(entry.rounds, lengths.get(name, 0))
    while True:
        lengths[name] = rounds
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(lengths, indent=2))
        run_suite(table_suites(entry, chosen, rounds)[0], out, timeout, only=(lead,))
        held = [read_results(run_path(out, name, lead, seed) / "results.json")
                for seed in SEEDS]
        curves = [scored_rounds(r, rounds)[:rounds] for r in held if r is not None]
        if len(curves) < len(SEEDS):
            return rounds  # a failed baseline run is the table's to show, not a reason to grow
        curve = convergence.mean_curve(curves)
        change = (f"{100 * convergence.moving_change(curve):+.2f} points"
                  if convergence.checkable(curve) else "(too few rounds to tell)")
        if convergence.flattened(curve) or rounds >= convergence.MAX_ROUNDS:
            verdict = "converged" if convergence.flattened(curve) else "the cap, not converged"
            print(f"protocol: {name} runs {rounds} rounds ({lead}'s mean moved {change} over "
                  f"its last 10: {verdict})", flush=True)
            return rounds
        rounds = min(rounds + convergence.EXTEND_BY, convergence.MAX_ROUNDS)
        print(f"protocol: {name}: {lead}'s mean moved {change} over its last 10 rounds, not "
              f"under {convergence.CONVERGED_POINTS}; taking it to {rounds}", flush=True)


def run_protocol(out: Path, run_suite: Callable[..., Path], timeout: float | None = None,
                 settings: tuple[ProtocolSetting, ...] = SETTINGS) -> Path:
    """Tune, then run the table; returns the table's results.csv."""
    tuning_dir = out / "tuning"
    records_path = tuning_dir / "trials.json"
    records: dict[str, Any] = (json.loads(records_path.read_text())
                               if records_path.is_file() else {})
    for entry in settings:
        if entry.setting.name not in records:
            tuning = Tuning(entry.setting, entry.methods, entry.rounds, TUNING_SEED,
                            tuning_dir, COMMON)
            records[entry.setting.name] = tuning.run(run_suite, timeout)
            tuning_dir.mkdir(parents=True, exist_ok=True)
            records_path.write_text(json.dumps(records, indent=2))
    write_chosen(tuning_dir / "chosen.yaml", list(records.values()))
    chosen = read_chosen(tuning_dir / "chosen.yaml")
    csv_path = out / "results.csv"
    # every setting's tuned table before any published one: the comparison first, the context
    # after it
    tables = []
    for entry in settings:
        picked = chosen[entry.setting.name]
        tables.append(table_suites(entry, picked,
                                   table_length(entry, picked, out, run_suite, timeout)))
    for suite in [tuned for tuned, _ in tables] + [published for _, published in tables]:
        csv_path = run_suite(suite, out, timeout)
    return csv_path
