"""The comparison protocol of DESIGN.md, end to end: `fedhpro-bench --protocol --out DIR`, on
the built-in settings or on any experiment YAML (`--config FILE`).

1. Tuning (`tuning`): every method, every setting, the same budget, scored on a validation
   share of the training pool, on seeds of its own (`TUNING_SEED` and the re-check's next
   one), never seen again. It also settles the table's length: the baseline's re-check grows
   until its validation curve has flattened (`convergence`), up to the setting's cap.
2. The table, each setting's after its tuning: each method as tuned on the table's seeds
   (`Budget.seeds`), then as published on the first `PUBLISHED_SEEDS` of them, with the
   validation share still held out (the clients see the same data as in tuning), all at the
   length the tuning settled.
3. RESULTS.md (`protocol_report`): mean of the last 5 rounds with 95% intervals, paired
   differences against FedHPro with win / tie / loss, rounds and megabytes to a target, the
   convergence check, every collapsed run with its cause, the per-seed curves.

Before anything runs, `cost` prints what the protocol will cost on this machine. Every step
resumes where it stopped: finished runs are kept, a half-done one continues from its
checkpoint, a finished tuning is read back from trials.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedhpro_flwr.methods import load_experiment
from fedhpro_lab import archive, cost
from fedhpro_lab.plan import PUBLISHED_SEEDS, SEEDS, TUNING_SEED, Budget, ProtocolSetting
from fedhpro_lab.suites import (
    ALL_STRATEGIES,
    PERSONAL,
    Setting,
    Suite,
    Variant,
    select_named,
)
from fedhpro_lab.tuning import (
    PUBLISHED,
    TRIALS,
    RunSuite,
    Tuning,
    read_chosen,
    with_validation,
    write_chosen,
)

# every setting, every run; the server evaluates on both cores while the clients wait
COMMON = "train.local_epochs=2 federation.server_threads=2"
PLAN = "protocol.json"  # what the last start of the protocol set out to run, for the report


# the second edition (issue 43): the four offline settings and hetero at the first edition's
# length, the two 100-class ones sized for the 2-core machine: shorter, and glyphs100-dir0.1 on
# half its images (docs/benchmarking.md)
SETTINGS = (
    ProtocolSetting(Setting("digits-offline", "conf/default.yaml"), 30, ALL_STRATEGIES, 60),
    ProtocolSetting(Setting("mnist-lt", "conf/mnist-lt.yaml"), 30, ALL_STRATEGIES, 60),
    ProtocolSetting(Setting("mnist-dir0.1", "conf/mnist-dir0.1.yaml"), 30, ALL_STRATEGIES, 60),
    ProtocolSetting(Setting("mnist-dir0.5", "conf/mnist-dir0.5.yaml"), 30, ALL_STRATEGIES, 60),
    ProtocolSetting(Setting("hetero", "conf/hetero.yaml"), 30, PERSONAL, 60),
    ProtocolSetting(Setting("glyphs100-lt", "conf/glyphs100-lt.yaml"), 20, ALL_STRATEGIES, 30),
    ProtocolSetting(Setting("glyphs100-dir0.1", "conf/glyphs100-dir0.1.yaml",
                            "data.samples_per_class=250"), 20, ALL_STRATEGIES, 30),
)


def select_settings(names: str) -> tuple[ProtocolSetting, ...]:
    """The protocol's settings named in a comma-separated list, in the protocol's order (all
    when empty): one table can be taken first, the same runs as in the full protocol."""
    return select_named(SETTINGS, names, lambda e: e.setting.name, "protocol setting")


def config_settings(configs: list[str], strategies: tuple[str, ...], rounds: int | None,
                    cap: int) -> tuple[ProtocolSetting, ...]:
    """The protocol on experiment YAMLs (each a setting named by its file's stem): the named
    strategies (default: every one that runs there, the personal ones with heterogeneous
    backbones); `rounds` fixes every length, else the file's rounds grow to `cap`."""
    unknown = sorted(set(strategies) - set(ALL_STRATEGIES))
    if unknown:
        raise ValueError(f"unknown strategy '{unknown[0]}'; available: "
                         f"{', '.join(ALL_STRATEGIES)}")
    entries = []
    for path in map(Path, configs):
        if not path.is_file():
            raise ValueError(f"--config '{path}': no such file")
        cfg = load_experiment(path.resolve())
        runnable = PERSONAL if cfg.model.backbone_list() else ALL_STRATEGIES
        alien = [s for s in strategies if s not in runnable]
        if alien:
            raise ValueError(f"--config '{path}' has heterogeneous backbones: "
                             f"{', '.join(alien)} cannot run there (these can: "
                             f"{', '.join(runnable)})")
        entries.append(ProtocolSetting(Setting(path.stem, str(path.resolve())),
                                       rounds or cfg.federation.rounds,
                                       strategies or runnable, cap, grow=rounds is None))
    names = [e.setting.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"--config files must have different names; got {', '.join(names)}")
    return tuple(entries)


def published_name(method: str) -> str:
    return f"{method}-published"


def table_suites(entry: ProtocolSetting, chosen: dict[str, str], rounds: int,
                 budget: Budget) -> tuple[Suite, Suite]:
    """The setting's final runs: every method as tuned (named as the method) on the budget's
    seeds, and as published on its published seeds, `rounds` long."""
    setting = with_validation(entry.setting)
    tuned = tuple(Variant(m, m, chosen[m]) for m in entry.methods)
    published = tuple(Variant(published_name(m), m, PUBLISHED[m]) for m in entry.methods)
    return (Suite("protocol", f"{entry.setting.name}: the tuned recipes", (setting,), tuned,
                  budget.seeds, rounds, overrides=COMMON),
            Suite("protocol", f"{entry.setting.name}: the published recipes", (setting,),
                  published, budget.published_seeds, rounds, overrides=COMMON))


def write_plan(out: Path, settings: tuple[ProtocolSetting, ...], budget: Budget) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN).write_text(json.dumps({
        "settings": {e.setting.name: list(e.methods) for e in settings},
        "trials": budget.trials, "seeds": list(budget.seeds),
        "published_seeds": list(budget.published_seeds)}, indent=2))


def read_plan(out: Path) -> dict[str, Any]:
    """What the protocol in `out` set out to run (the built-in one's when it wrote none)."""
    path = out / PLAN
    if path.is_file():
        return json.loads(path.read_text())
    return {"settings": {e.setting.name: list(e.methods) for e in SETTINGS},
            "trials": TRIALS, "seeds": list(SEEDS),
            "published_seeds": list(SEEDS[:PUBLISHED_SEEDS])}


def tuned_as_planned(record: dict[str, Any], entry: ProtocolSetting, budget: Budget) -> bool:
    """Whether a finished tuning's record is this plan's (the same methods, budget, rounds and
    length rule); if not, the setting is tuned again, its finished trials kept."""
    length = entry.length
    return (list(record.get("chosen", {})) == list(entry.methods)
            and record.get("budget") == budget.trials and record.get("rounds") == entry.rounds
            and record.get("cap") == length.cap and record.get("grow") == length.grow)


def run_protocol(out: Path, run_suite: RunSuite, timeout: float | None = None,
                 settings: tuple[ProtocolSetting, ...] = SETTINGS,
                 budget: Budget | None = None) -> Path:
    """Say what it will cost, tune, then run the tables; returns the tables' results.csv.
    The runs are restored from `archive.ARCHIVE` first, and packed into it after every suite."""
    budget = budget or Budget()
    restored = archive.unpack(out)
    if restored:
        print(f"protocol: {restored} runs restored from {out / archive.ARCHIVE}", flush=True)
    write_plan(out, settings, budget)
    given = run_suite

    def run_suite(suite: Suite, folder: Path, timeout: float | None = None,
                  only: tuple[str, ...] = ()) -> Path:
        try:
            return given(suite, folder, timeout, only)
        finally:
            archive.pack(out)

    probes = cost.probe(settings, out, run_suite, TUNING_SEED, COMMON, timeout)
    print("\n".join(cost.estimate(settings, budget, probes)), flush=True)
    tuning_dir = out / "tuning"
    records_path = tuning_dir / "trials.json"
    records: dict[str, Any] = (json.loads(records_path.read_text())
                               if records_path.is_file() else {})
    csv_path = out / "results.csv"
    for entry in settings:
        record = records.get(entry.setting.name)
        if record is None or not tuned_as_planned(record, entry, budget):
            tuning = Tuning(entry.setting, entry.methods, entry.rounds, TUNING_SEED,
                            tuning_dir, COMMON, budget.trials)
            records[entry.setting.name] = tuning.run(run_suite, timeout, entry.length)
            tuning_dir.mkdir(parents=True, exist_ok=True)
            records_path.write_text(json.dumps(records, indent=2))
        write_chosen(tuning_dir / "chosen.yaml", list(records.values()))
        chosen = read_chosen(tuning_dir / "chosen.yaml")[entry.setting.name]
        # setting by setting, so that a long protocol finishes whole rows as it goes; the
        # tuned table before the published one: the comparison first, the context after it
        for suite in table_suites(entry, chosen, records[entry.setting.name]["length"], budget):
            csv_path = run_suite(suite, out, timeout)
    return csv_path
