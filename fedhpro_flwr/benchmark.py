"""`fedhpro-bench`: strategies x settings x seeds through Flower's simulation engine.

    fedhpro-bench --suite smoke --out /tmp/bench
    python -m fedhpro_flwr.benchmark --suite default --out benchmarks/default

Every run is a child process running `fedhpro_flwr.simulation` (one simulation engine per
run, so a crash or a leak stays in its run). The suite goes on past a failed run and records
it with its reason; started again with the same --out it skips finished runs and continues a
half-done one from its checkpoint. When all runs are done, `report` writes RESULTS.md and the
plots from results.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import load_experiment, parse_overrides
from .simulation import APP_DIR
from .suites import SUITES, Setting, Suite

COLUMNS = ("suite", "setting", "strategy", "seed", "status", "reason", "final_accuracy",
           "best_accuracy", "mean_last5_accuracy", "rounds", "run_seconds", "wall_seconds",
           "client_seconds", "client_seconds_max", "server_seconds", "framework_seconds",
           "workers", "bytes_up_per_round", "bytes_down_per_round")
KEY = ("setting", "strategy", "seed")


@dataclass(frozen=True)
class Run:
    suite: Suite
    setting: Setting
    strategy: str
    seed: int
    out_dir: Path
    rounds: int
    supernodes: int

    @property
    def key(self) -> tuple[str, str, str]:
        return self.setting.name, self.strategy, str(self.seed)

    def run_config(self, resume: bool) -> dict[str, Any]:
        return {"strategy": self.strategy, "config": self.setting.config,
                "num-server-rounds": self.rounds, "seed": self.seed,
                "out-dir": str(self.out_dir), "resume": resume,
                "overrides": f"{self.suite.overrides} {self.setting.overrides}".strip()}


def plan(suite: Suite, out: Path) -> list[Run]:
    """Every run of the suite, setting by setting, seed by seed, strategy by strategy."""
    runs = []
    for setting in suite.settings:
        overrides = parse_overrides(f"{suite.overrides} {setting.overrides}")
        cfg = load_experiment(APP_DIR / setting.config, overrides)
        rounds = suite.rounds or cfg.federation.rounds
        for seed in suite.seeds:
            for strategy in suite.strategies:
                runs.append(Run(suite, setting, strategy, seed,
                                out / "runs" / setting.name / strategy / f"seed{seed}", rounds,
                                cfg.partition.num_partitions))
    return runs


def workers(suite: Suite, clients: int) -> int:
    """How many clients the simulation engine trains at once on this machine."""
    slots = max(int((os.cpu_count() or 1) // suite.cpus_per_client), 1)
    if suite.gpus_per_client:
        slots = min(slots, int(1 / suite.gpus_per_client))
    return min(slots, clients)


def summarize(run: Run, results: dict[str, Any], run_seconds: float) -> dict[str, Any]:
    """One results.csv row from a finished run's results.json. Times are means per round over
    rounds 2 and later when there are any: round 1 also pays the engine's start-up (client
    actors, imports), which is in `run_seconds` but is not the cost of a round."""
    rows = results["rounds"]
    timed = rows[1:] or rows

    def mean(key: str) -> float:
        return sum(r[key] for r in timed) / len(timed)

    parallel = workers(run.suite, run.supernodes)
    wall, server = mean("wall_seconds"), mean("server_seconds")
    row: dict[str, Any] = {
        "suite": run.suite.name, "setting": run.setting.name, "strategy": run.strategy,
        "seed": run.seed, "status": "ok", "reason": "",
        "final_accuracy": rows[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rows),
        "mean_last5_accuracy": sum(r["accuracy"] for r in rows[-5:]) / len(rows[-5:]),
        "rounds": len(rows), "run_seconds": run_seconds, "wall_seconds": wall,
        "client_seconds": mean("client_seconds"),
        "client_seconds_max": mean("client_seconds_max"), "server_seconds": server,
        # what is neither client nor server compute, with `parallel` clients training at once
        "framework_seconds": max(wall - server - mean("client_seconds") / parallel, 0.0),
        "workers": parallel,
        "bytes_up_per_round": mean("bytes_up"), "bytes_down_per_round": mean("bytes_down"),
    }
    row.update({k: v for k, v in rows[-1].items() if k.startswith("accuracy_")})
    return row


def failure_reason(log: Path, returncode: int) -> str:
    """The run's last ERROR line, else its last line, for results.csv."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [line for line in lines if "ERROR" in line]
    text = (errors or lines or [""])[-1].strip()
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
    """Which run, which round, and the suite's ETA from the rounds timed so far."""

    def __init__(self, runs: list[Run], done: int):
        self.total_rounds = sum(r.rounds for r in runs)
        self.rounds_done = sum(r.rounds for r in runs[:done])
        self.seconds = 0.0
        self.timed_rounds = 0
        self.count = len(runs)

    def line(self, index: int, run: Run, round_: int, accuracy: float | None,
             elapsed: float) -> str:
        timed = self.timed_rounds + round_
        acc = "" if accuracy is None else f" accuracy {accuracy:.4f}"
        eta = "?"
        if timed:
            remaining = self.total_rounds - self.rounds_done - round_
            left = remaining * (self.seconds + elapsed) / timed
            eta = time.strftime("%H:%M:%S", time.gmtime(left))
        return (f"[{index + 1}/{self.count}] {run.setting.name} {run.strategy} seed {run.seed}: "
                f"round {round_}/{run.rounds}{acc} | suite ETA {eta}")

    def finish(self, run: Run, seconds: float, rounds_run: int) -> None:
        self.rounds_done += run.rounds
        self.seconds += seconds
        self.timed_rounds += rounds_run


def rounds_in(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(path.read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def execute(run: Run, index: int, progress: Progress, timeout: float | None) -> dict[str, Any]:
    """Run one experiment in a child process, printing its rounds as they finish."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    log = run.out_dir / "run.log"
    results_path = run.out_dir / "results.json"
    resume = (run.out_dir / "checkpoint.pt").is_file()
    before = len(rounds_in(results_path)) if resume else 0
    command = [sys.executable, "-m", "fedhpro_flwr.simulation",
               "--run-config", json.dumps(run.run_config(resume)),
               "--supernodes", str(run.supernodes),
               "--cpus-per-client", str(run.suite.cpus_per_client),
               "--gpus-per-client", str(run.suite.gpus_per_client)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    seen = before
    print(progress.line(index, run, seen, None, 0.0), flush=True)
    with open(log, "a") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 cwd=APP_DIR)
        while child.poll() is None:
            time.sleep(1.0)
            elapsed = time.perf_counter() - start
            rows = rounds_in(results_path)
            if len(rows) > seen:
                seen = len(rows)
                print(progress.line(index, run, seen, rows[-1]["accuracy"], elapsed), flush=True)
            if timeout and elapsed > timeout:
                child.kill()
                child.wait()
                out.write(f"ERROR fedhpro-bench: stopped after {timeout:.0f} s\n")
    seconds = time.perf_counter() - start
    progress.finish(run, seconds, max(seen - before, 0))
    rows = rounds_in(results_path)
    if len(rows) == run.rounds and child.returncode == 0:
        return summarize(run, json.loads(results_path.read_text()), seconds)
    return {"suite": run.suite.name, "setting": run.setting.name, "strategy": run.strategy,
            "seed": run.seed, "status": "failed", "rounds": len(rows), "run_seconds": seconds,
            "reason": failure_reason(log, child.returncode)}


def run_suite(suite: Suite, out: Path, timeout: float | None = None) -> Path:
    """Run every unfinished run of `suite` into `out`; returns results.csv's path."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    runs = plan(suite, out)
    finished = [r for r in runs if rows.get(r.key, {}).get("status") == "ok"]
    pending = [r for r in runs if r not in finished]
    if finished:
        print(f"fedhpro-bench: {len(finished)} of {len(runs)} runs already done in {out}; "
              "running the rest", flush=True)
    progress = Progress(finished + pending, len(finished))
    for i, run in enumerate(pending, start=len(finished)):
        row = execute(run, i, progress, timeout)
        rows[run.key] = row
        write_rows(csv_path, rows)
        if row["status"] != "ok":
            print(f"  failed, recorded, going on: {row['reason']}", flush=True)
    failed = sum(1 for r in rows.values() if r.get("status") != "ok")
    print(f"fedhpro-bench: {len(runs) - failed} of {len(runs)} runs ok -> {csv_path}", flush=True)
    return csv_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedhpro-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="seconds before a run is stopped and recorded as failed")
    parser.add_argument("--no-report", action="store_true", help="skip RESULTS.md and plots")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    print(f"fedhpro-bench: suite '{suite.name}': {suite.description}", flush=True)
    csv_path = run_suite(suite, args.out.resolve(), args.run_timeout)
    if not args.no_report:
        from .report import write_report

        command = " ".join(["fedhpro-bench", *(sys.argv[1:] if argv is None else argv)])
        print(f"report: {write_report(csv_path, command)}", flush=True)
    rows = read_rows(csv_path)
    return 0 if all(r.get("status") == "ok" for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
