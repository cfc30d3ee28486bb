"""The comparison protocol of DESIGN.md, end to end: `fedhpro-bench --protocol --out DIR`.

1. Tuning (`tuning`): every method, every setting, the same budget, scored on a validation
   share of the training pool, on a seed of its own (`TUNING_SEED`), never seen again.
2. The table: each method as tuned on `SEEDS` (every setting), then as published on
   `PUBLISHED_SEEDS`, with the validation share still held out (the clients see the same data as
   in tuning).
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

from fedhpro_lab.suites import ALL_STRATEGIES, PERSONAL, Setting, Suite, Variant
from fedhpro_lab.tuning import PUBLISHED, VALIDATION, Tuning, read_chosen, write_chosen

TUNING_SEED = 100
SEEDS = (0, 1, 2, 3, 4)
PUBLISHED_SEEDS = (0, 1, 2)  # the published recipes are context, not the comparison
# every setting, every run; the server evaluates on both cores while the clients wait
COMMON = "train.local_epochs=2 federation.server_threads=2"


@dataclass(frozen=True)
class ProtocolSetting:
    setting: Setting
    rounds: int  # long enough for FedAvg's curve to flatten (see the report's check)
    methods: tuple[str, ...]


SETTINGS = (
    ProtocolSetting(Setting("digits-offline", "conf/default.yaml"), 30, ALL_STRATEGIES),
    ProtocolSetting(Setting("mnist-dir0.1", "conf/mnist-dir0.1.yaml"), 30, ALL_STRATEGIES),
    ProtocolSetting(Setting("mnist-dir0.5", "conf/mnist-dir0.5.yaml"), 30, ALL_STRATEGIES),
    ProtocolSetting(Setting("mnist-lt", "conf/mnist-lt.yaml"), 30, ALL_STRATEGIES),
    ProtocolSetting(Setting("hetero", "conf/hetero.yaml"), 30, PERSONAL),
)


def published_name(method: str) -> str:
    return f"{method}-published"


def table_suites(entry: ProtocolSetting, chosen: dict[str, str]) -> tuple[Suite, Suite]:
    """The setting's final runs: every method as tuned (named as the method) on `SEEDS`, and
    as published on `PUBLISHED_SEEDS`."""
    setting = Setting(entry.setting.name, entry.setting.config,
                      f"{entry.setting.overrides} {VALIDATION}".strip())
    tuned = tuple(Variant(m, m, chosen[m]) for m in entry.methods)
    published = tuple(Variant(published_name(m), m, PUBLISHED[m]) for m in entry.methods)
    return (Suite("protocol", f"{entry.setting.name}: the tuned recipes", (setting,), tuned,
                  SEEDS, entry.rounds, overrides=COMMON),
            Suite("protocol", f"{entry.setting.name}: the published recipes", (setting,),
                  published, PUBLISHED_SEEDS, entry.rounds, overrides=COMMON))


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
    tables = [table_suites(entry, chosen[entry.setting.name]) for entry in settings]
    for suite in [tuned for tuned, _ in tables] + [published for _, published in tables]:
        csv_path = run_suite(suite, out, timeout)
    return csv_path
