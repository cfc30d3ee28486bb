"""Run a suite (strategies x settings x seeds) through Flower's simulation engine: the
machinery behind `fedhpro-bench` (its command line is `bench_cli`).

The runs of one (setting, seed) share a child process running `fedhpro_lab.simulation`:
one simulation engine start-up (about 30 s here) for all its strategies, and a crash stays
in its group. The suite goes on past a failed run and records it with its reason; started
again with the same --out it skips finished runs and continues a half-done one from its
checkpoint. `report` writes RESULTS.md and the plots from the results.csv it leaves.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhpro_flwr.app.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
)
from fedhpro_flwr.app.personal_store import missing_models, trained_partitions
from fedhpro_flwr.config import (
    ExperimentConfig,
    parse_overrides,
    resolve_run_config,
)
from fedhpro_flwr.methods import SECTIONS, load_experiment
from fedhpro_lab import proctree
from fedhpro_lab.simulation import APP_DIR
from fedhpro_lab.suites import (
    Setting,
    Suite,
    Variant,
    run_path,
)

COLUMNS = ("suite", "setting", "strategy", "seed", "status", "reason", "final_accuracy",
           "best_accuracy", "mean_last5_accuracy", "rounds", "run_seconds", "wall_seconds",
           "client_seconds", "client_seconds_max", "client_busy_seconds", "server_seconds",
           "framework_seconds", "workers", "bytes_up_per_round", "bytes_down_per_round",
           "peak_rss_mb")
KEY = ("setting", "strategy", "seed")
SCORED = ("ok", "diverged")  # the statuses of a row that is a result (see scored_rounds)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # the colours of Flower's log lines


@dataclass(frozen=True)
class Run:
    suite: Suite
    setting: Setting
    variant: Variant
    seed: int
    out_dir: Path
    rounds: int
    supernodes: int

    @property
    def strategy(self) -> str:
        """The row's name in results.csv and RESULTS.md (the variant's)."""
        return self.variant.name

    @property
    def key(self) -> tuple[str, str, str]:
        return self.setting.name, self.strategy, str(self.seed)

    def run_config(self, resume: bool) -> dict[str, Any]:
        overrides = (self.suite.overrides, self.setting.overrides, self.variant.overrides)
        return {"strategy": self.variant.strategy, "config": self.setting.config,
                "num-server-rounds": self.rounds, "seed": self.seed,
                "out-dir": str(self.out_dir), "resume": resume,
                "overrides": " ".join(o for o in overrides if o)}


def plan(suite: Suite, out: Path, only: tuple[str, ...] = ()) -> list[Run]:
    """Every run of the suite (of the variants named in `only`, when given), setting by
    setting, seed by seed, variant by variant."""
    names = [v.name for v in suite.variants]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ValueError(f"suite '{suite.name}' has no {', '.join(unknown)}; "
                         f"it runs {', '.join(names)}")
    variants = [v for v in suite.variants if not only or v.name in only]
    runs = []
    for setting in suite.settings:
        overrides = parse_overrides(f"{suite.overrides} {setting.overrides}")
        cfg = load_experiment(APP_DIR / setting.config, overrides)
        rounds = suite.rounds or cfg.federation.rounds
        for seed in suite.seeds:
            for variant in variants:
                runs.append(Run(suite, setting, variant, seed,
                                run_path(out, setting.name, variant.name, seed),
                                rounds, cfg.partition.num_partitions))
    return runs


def workers(suite: Suite, clients: int) -> int:
    """How many clients the simulation engine trains at once on this machine."""
    slots = max(int((os.cpu_count() or 1) // suite.cpus_per_client), 1)
    if suite.gpus_per_client:
        slots = min(slots, int(1 / suite.gpus_per_client))
    return min(slots, clients)


def scored_rounds(results: dict[str, Any], rounds: int) -> list[dict[str, Any]]:
    """The run's rounds; those of a run whose training diverged completed to `rounds` with
    the accuracies it ended with (marked `carried`, moving no bytes). Such a run cannot go
    on: every later round would train from the same model. Scored this way it stays in its
    method's mean over seeds, which would otherwise be the mean of the stable seeds alone."""
    rows = results["rounds"]
    last = rows[-1] if rows else results.get("initial", {})
    kept = {key: value for key, value in last.items() if "accuracy" in key}
    if "diverged_round" not in results or len(rows) >= rounds or "accuracy" not in kept:
        return rows
    return rows + [{"round": r, **kept, "bytes_up": 0.0, "bytes_down": 0.0, "carried": True}
                   for r in range(len(rows) + 1, rounds + 1)]


def summarize(run: Run, results: dict[str, Any], run_seconds: float) -> dict[str, Any]:
    """One results.csv row from a finished (or diverged) run's results.json. Times are means
    per round over rounds 2 and later when there are any: round 1 also pays the engine's
    start-up (client actors, imports), which is in `run_seconds` but is not the cost of a
    round. Accuracies are those of `scored_rounds`."""
    rows = scored_rounds(results, run.rounds)
    ran = results["rounds"]
    timed = ran[1:] or ran

    def mean(key: str) -> float:
        return sum(r[key] for r in timed) / len(timed) if timed else float("nan")

    parallel = workers(run.suite, run.supernodes)
    wall, server = mean("wall_seconds"), mean("server_seconds")
    if all("client_busy_seconds" in r for r in timed):
        busy = mean("client_busy_seconds")
    else:  # a run recorded before clients stamped their start: clients perfectly balanced
        busy = mean("client_seconds") / parallel
    diverged = len(rows) > len(ran)
    row: dict[str, Any] = {
        "suite": run.suite.name, "setting": run.setting.name, "strategy": run.strategy,
        "seed": run.seed, "status": "diverged" if diverged else "ok",
        "reason": (f"training diverged in round {results['diverged_round']}; rounds "
                   f"{len(ran) + 1}-{len(rows)} scored at its last accuracy" if diverged else ""),
        "final_accuracy": rows[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rows),
        "mean_last5_accuracy": sum(r["accuracy"] for r in rows[-5:]) / len(rows[-5:]),
        "rounds": len(rows), "run_seconds": run_seconds, "wall_seconds": wall,
        "client_seconds": mean("client_seconds"),
        "client_seconds_max": mean("client_seconds_max"), "client_busy_seconds": busy,
        "server_seconds": server,
        # the part of a round in which neither a client nor the server computes
        "framework_seconds": max(wall - server - busy, 0.0),
        "workers": parallel,
        "bytes_up_per_round": mean("bytes_up"), "bytes_down_per_round": mean("bytes_down"),
    }
    row.update({k: v for k, v in rows[-1].items() if k.startswith("accuracy_")
                or k in ("client_accuracy_std", "client_accuracy_min")})  # heterogeneous clients
    return row


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc; 0 elsewhere): the
    simulation engine's workers are grandchildren of the run's process."""
    return proctree.rss_mb(proctree.tree(pid))


def failure_reason(log: Path, returncode: int, out_dir: Path) -> str:
    """Why a run failed, for results.csv: its own ERROR line in the group's log, else the
    log's last ERROR line (a crash that took the whole group), else its last line."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [line for line in lines if "ERROR" in line]
    own = [line for line in errors if str(out_dir) in line]
    text = ANSI_ESCAPE.sub("", (own or errors or lines or [""])[-1]).strip()
    return f"exit code {returncode}: {text}"[:300]


def read_rows(path: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {tuple(row[k] for k in KEY): row for row in csv.DictReader(f)}  # type: ignore


def write_rows(path: Path, rows: dict[tuple[str, str, str], dict[str, Any]]) -> None:
    extra = sorted({k for row in rows.values() for k in row} - set(COLUMNS))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra], restval="")
        writer.writeheader()
        writer.writerows(rows.values())
    os.replace(tmp, path)


class Progress:
    """Which run, which round, and the suite's ETA from the rounds finished so far."""

    def __init__(self, runs: list[Run], done: int, clock: Any = time.perf_counter):
        self.left = sum(r.rounds for r in runs[done:])
        self.count = len(runs)
        self.clock = clock
        self.start = clock()
        self.finished = 0

    def advance(self, rounds: int) -> None:
        self.finished += rounds

    def line(self, index: int, run: Run, round_: int, accuracy: float | None) -> str:
        eta = "?"
        if self.finished:
            per_round = (self.clock() - self.start) / self.finished
            eta = time.strftime("%H:%M:%S", time.gmtime((self.left - self.finished) * per_round))
        acc = "" if accuracy is None else f" accuracy {accuracy:.4f}"
        return (f"[{index + 1}/{self.count}] {run.setting.name} {run.strategy} seed {run.seed}: "
                f"round {round_}/{run.rounds}{acc} | suite ETA {eta}")


def read_results(path: Path) -> dict[str, Any] | None:
    """A results.json, or None if there is none (or it is cut short)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and "rounds" in results else None


def rounds_in(path: Path) -> list[dict[str, Any]]:
    results = read_results(path)
    return results["rounds"] if results else []


def holds_rounds(results: dict[str, Any] | None, rounds: int) -> bool:
    """Whether a results.json holds `rounds` scored rounds or more (a diverged run holds
    them all)."""
    return results is not None and len(scored_rounds(results, rounds)) >= rounds


def same_setup(run: Run, results: dict[str, Any]) -> bool:
    """Whether a results.json was written under this run's experiment, as far as the run
    depends on it (`ExperimentConfig.setup_changes`: rounds, where it computes and other
    methods' keys aside; a key the code gained since counts at its first value)."""
    current = resolve_run_config(run.run_config(resume=False), APP_DIR, SECTIONS).experiment
    return not current.setup_changes(results.get("config", {}), run.variant.strategy,
                                     results.get("num_classes"))


def finished_results(run: Run) -> dict[str, Any] | None:
    """The run's results.json if it holds its rounds (or more, or diverged before them),
    made under its setup."""
    results = read_results(run.out_dir / "results.json")
    if holds_rounds(results, run.rounds) and same_setup(run, results):
        return results
    return None


def finished_here(run: Run) -> bool:
    """Whether the run's results.json holds its rounds (or more), made under its setup."""
    return finished_results(run) is not None


STALE_CHECKPOINT = "checkpoint.stale.pt"
STALE_RESULTS = "results.stale.json"


def resumable(run: Run) -> bool:
    """Whether the run continues from its checkpoint. One written under another config (a
    setting changed, or a key the code has gained since) cannot be continued: it is set aside
    as `STALE_CHECKPOINT` and the run starts afresh, instead of failing to resume."""
    if not (run.out_dir / CHECKPOINT_NAME).is_file():
        return False
    settings = resolve_run_config(run.run_config(resume=True), APP_DIR, SECTIONS)
    try:
        checkpoint = load_checkpoint(run.out_dir, run.variant.strategy, settings.experiment)
        check_personal_models(settings.experiment, checkpoint)
    except CheckpointError as exc:
        (run.out_dir / CHECKPOINT_NAME).replace(run.out_dir / STALE_CHECKPOINT)
        print(f"  {run.setting.name} {run.strategy} seed {run.seed}: starting afresh ({exc})",
              flush=True)
        return False
    return True


def check_personal_models(cfg: ExperimentConfig, checkpoint: Checkpoint) -> None:
    """With personal models, the clients' saved models must be on this machine's disk (the
    simulated nodes' disk), or the resumed run would stop at its first round."""
    if not cfg.model.backbone_list():
        return
    trained = trained_partitions(checkpoint.results.get("rounds", []))
    missing = missing_models(cfg, checkpoint.results["experiment_id"], trained,
                             checkpoint.round)
    if missing:
        raise CheckpointError(f"the personal models of partitions {missing} at round "
                              f"{checkpoint.round} are not on this machine")


def execute(group: list[Run], first: int, progress: Progress,
            timeout: float | None) -> list[dict[str, Any]]:
    """Run one (setting, seed)'s runs one after another in a child process (one engine
    start-up for all), printing rounds as they finish; a row per run."""
    log = group[0].out_dir.parent.parent / f"seed{group[0].seed}.log"
    configs = []
    for run in group:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        resume = resumable(run)
        if not resume and (run.out_dir / "results.json").is_file():
            # an earlier attempt's rounds: neither progress nor, should this one fail before
            # its first round, a finished run
            (run.out_dir / "results.json").replace(run.out_dir / STALE_RESULTS)
        configs.append(run.run_config(resume=resume))
    seen = [len(rounds_in(r.out_dir / "results.json")) if c["resume"] else 0
            for r, c in zip(group, configs, strict=True)]
    command = [sys.executable, "-m", "fedhpro_lab.simulation",
               "--run-config", json.dumps(configs), "--supernodes", str(group[0].supernodes),
               "--cpus-per-client", str(group[0].suite.cpus_per_client),
               "--gpus-per-client", str(group[0].suite.gpus_per_client)]
    if group[0].suite.attack:
        command += ["--attack", group[0].suite.attack]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    peak = 0.0
    print(progress.line(first, group[0], seen[0], None), flush=True)
    with open(log, "a") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 cwd=APP_DIR)
        try:
            while child.poll() is None:
                time.sleep(1.0)
                peak = max(peak, tree_rss_mb(child.pid))
                for i, run in enumerate(group):
                    rows = rounds_in(run.out_dir / "results.json")
                    if len(rows) > seen[i]:
                        progress.advance(len(rows) - seen[i])
                        seen[i] = len(rows)
                        print(progress.line(first + i, run, seen[i], rows[-1]["accuracy"]),
                              flush=True)
                elapsed = time.perf_counter() - start
                if timeout and elapsed > timeout * len(group):
                    proctree.kill_tree(child)
                    out.write(f"ERROR fedhpro-bench: stopped after {elapsed:.0f} s\n")
        finally:  # stopped (Ctrl-C, SIGTERM): the engine and its workers go too
            if child.poll() is None:
                proctree.kill_tree(child)
    seconds = time.perf_counter() - start
    rows_out = []
    for run in group:
        results = read_results(run.out_dir / "results.json")
        share = seconds / len(group)  # the group's time, shared out
        # (a run may hold more rounds: it went on to a later rung)
        if holds_rounds(results, run.rounds):
            row = summarize(run, results, share)
            rows_out.append({**row, "peak_rss_mb": peak})  # the group's peak
        else:
            rows_out.append({"suite": run.suite.name, "setting": run.setting.name,
                             "strategy": run.strategy, "seed": run.seed, "status": "failed",
                             "rounds": len(results["rounds"]) if results else 0,
                             "run_seconds": share,
                             "reason": failure_reason(log, child.returncode, run.out_dir)})
    return rows_out


def is_done(row: dict[str, Any], rounds: int) -> bool:
    """Whether a results.csv row is the run finished at `rounds` (a run asked for more rounds
    than its row holds continues from its checkpoint)."""
    return row.get("status") in SCORED and int(float(row.get("rounds") or 0)) == rounds


def run_suite(suite: Suite, out: Path, timeout: float | None = None,
              only: tuple[str, ...] = ()) -> Path:
    """Run every unfinished run of `suite` (of the variants in `only`, when given) into `out`;
    returns results.csv's path."""
    runs = plan(suite, out, only)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    recovered = False
    for run in runs:  # finished, but its group was cut off before its row was written
        results = None if is_done(rows.get(run.key, {}), run.rounds) else finished_results(run)
        if results is not None and len(scored_rounds(results, run.rounds)) == run.rounds:
            rows[run.key] = {**summarize(run, results, float("nan")), "peak_rss_mb": float("nan")}
            recovered = True
    if recovered:
        write_rows(csv_path, rows)
    finished = [r for r in runs if is_done(rows.get(r.key, {}), r.rounds)]
    pending = [r for r in runs if r not in finished]
    if finished:
        print(f"fedhpro-bench: {len(finished)} of {len(runs)} runs already done in {out}; "
              "running the rest", flush=True)
    progress = Progress(finished + pending, len(finished))
    groups: dict[tuple[str, int], list[Run]] = {}
    for run in pending:
        groups.setdefault((run.setting.name, run.seed), []).append(run)
    index = len(finished)
    for group in groups.values():
        for run, row in zip(group, execute(group, index, progress, timeout), strict=True):
            rows[run.key] = row
            if row["status"] != "ok":
                print(f"  {run.setting.name} {run.strategy} seed {run.seed} {row['status']}, "
                      f"recorded, going on: {row['reason']}", flush=True)
        write_rows(csv_path, rows)
        index += len(group)
    statuses = [rows.get(r.key, {}).get("status") for r in runs]
    print(f"fedhpro-bench: {statuses.count('ok')} of {len(runs)} runs ok, "
          f"{statuses.count('diverged')} diverged -> {csv_path}", flush=True)
    return csv_path
