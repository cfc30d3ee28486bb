"""One experiment in simulation and in deployment on this machine: what a round costs.

    fedhpro-bench measure deployment [--supernodes 8] [--rounds 3] [--out /tmp/deployment]
                                     [--markdown benchmarks/measurements/DEPLOYMENT.md]

Runs the same FedHPro experiment (conf/mnist-dir0.5.yaml, one partition per SuperNode, every
node trained every round) twice: through Flower's simulation engine, and through real
processes on 127.0.0.1 (`flower-superlink`, `--supernodes` x `flower-supernode`,
`flwr run`), the deployment path of docs/deployment.md. More SuperNodes than cores is the
load case: every ClientApp is a fresh process that imports torch and loads its data.
Also times that process start alone (`import client_app` in a new interpreter). Writes both
runs' results.json under --out and a table of round times to --markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from fedhpro_lab import proctree
from fedhpro_lab.localfed import LocalFederation
from fedhpro_lab.measure import RESULTS_DIR
from fedhpro_lab.simulation import APP_DIR

CONFIG = "conf/mnist-dir0.5.yaml"
IDLE_SECONDS = 30.0


def run_config(out: Path, nodes: int, rounds: int) -> dict[str, Any]:
    """The run: one partition per node, every node trained every round, one local epoch."""
    return {"config": CONFIG, "num-server-rounds": rounds, "out-dir": str(out),
            "overrides": f"partition.num_partitions={nodes} federation.min_train_nodes={nodes} "
                         "train.local_epochs=1"}


def in_simulation(out: Path, nodes: int, rounds: int) -> float:
    """Seconds for the run through Flower's simulation engine, in a new process (the engine's
    start included, as in deployment)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedhpro_lab.simulation", "--supernodes", str(nodes),
                    "--run-config", json.dumps([run_config(out, nodes, rounds)])],
                   check=True, cwd=APP_DIR, capture_output=True)
    return time.perf_counter() - start


def in_deployment(out: Path, nodes: int, rounds: int) -> tuple[float, float]:
    """Seconds for the run, and the cores the idle federation used before it."""
    configs = [f"partition-id={i} num-partitions={nodes}" for i in range(nodes)]
    with LocalFederation(out / "federation", configs) as federation:
        time.sleep(10)  # let every SuperNode connect
        pids = federation.pids()
        before = proctree.cpu_seconds(pids)
        time.sleep(IDLE_SECONDS)
        idle_cores = (proctree.cpu_seconds(pids) - before) / IDLE_SECONDS
        start = time.perf_counter()
        status = federation.run(APP_DIR, run_config(out, nodes, rounds), timeout=3600)
        seconds = time.perf_counter() - start
    if status != "finished:completed":
        raise SystemExit(f"deployment run ended {status}; logs in {out / 'federation'}")
    return seconds, idle_cores


def process_start(repeats: int = 3) -> float:
    """Median seconds for a new interpreter to import the ClientApp (torch, flwr, this app)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import client_app"], check=True, cwd=APP_DIR)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """A mode's mean round (wall, client compute, server step, what is left) and its final
    accuracy."""

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in rows)

    return {"wall": mean("wall_seconds"), "client_sum": mean("client_seconds"),
            "client_max": mean("client_seconds_max"), "server": mean("server_seconds"),
            "overhead": mean("wall_seconds") - mean("client_seconds_max")
            - mean("server_seconds"),
            "accuracy": rows[-1]["accuracy"]}


def report_text(nodes: int, rounds: int, totals: dict[str, float],
           rounds_of: dict[str, list[dict[str, Any]]], start_seconds: float,
           idle_cores: float) -> str:
    """The markdown table of both modes' round times (`rounds_of`: each mode's results.json
    rounds) and what the deployment's extra time is made of."""
    lines = [
        f"# Simulation vs deployment: {nodes} SuperNodes on {os.cpu_count()} cores",
        "",
        f"FedHPro, `{CONFIG}` split into {nodes} partitions (one per SuperNode, all trained "
        f"every round), 1 local epoch, {rounds} rounds. Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; {date.today()}.",
        f"Command: `fedhpro-bench measure deployment --supernodes {nodes} --rounds {rounds}`.",
        "",
        "Round times are means over the rounds after the first (round 1 includes start-up); "
        "client compute is the time inside the trainer (extraction + local epochs), summed "
        "over clients and the slowest one. What is left of a round without the slowest "
        "client's compute and the server step is the framework's and the ClientApp process's "
        "(start, imports, loading the partition, encoding).",
        "",
        "| mode | total s | round wall s | client compute, sum s | slowest client s "
        "| server step s | round - slowest client - server s | final accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    per_mode = {}
    for mode, rows in rounds_of.items():
        per_mode[mode] = s = summary(rows[1:] or rows)
        lines.append(f"| {mode} | {totals[mode]:.1f} | {s['wall']:.1f} | {s['client_sum']:.1f} "
                     f"| {s['client_max']:.1f} | {s['server']:.2f} | {s['overhead']:.1f} "
                     f"| {s['accuracy']:.4f} |")
    extra = per_mode["deployment"]["wall"] - per_mode["simulation"]["wall"]
    lines += [
        "",
        f"A deployment round took {extra:+.1f} s against simulation "
        f"({per_mode['deployment']['wall'] / per_mode['simulation']['wall']:.2f}x), "
        f"{extra / nodes:+.2f} s per client. A new ClientApp process alone (interpreter, "
        f"torch, flwr and this app imported) took {start_seconds:.2f} s here; in deployment "
        "every client pays it, and loads its partition, in every round.",
        "",
        f"Idle, before the run, the SuperLink and the {nodes} SuperNodes (with their SuperExec "
        f"processes) used {idle_cores:.2f} cores together (CPU time over {IDLE_SECONDS:.0f} s).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", type=int, default=8,
                        help="SuperNodes, one partition each, in both modes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedhpro-deployment"),
                        help="where both runs' results.json go (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, default=RESULTS_DIR / "DEPLOYMENT.md",
                        help="where the table is written (default: %(default)s)")
    args = parser.parse_args(argv)
    nodes, rounds = args.supernodes, args.rounds

    start_seconds = process_start()
    print(f"ClientApp process start (import): {start_seconds:.2f} s", flush=True)
    totals = {}
    print(f"simulation: {nodes} SuperNodes, {rounds} rounds ...", flush=True)
    totals["simulation"] = in_simulation(args.out / "simulation", nodes, rounds)
    print(f"deployment: {nodes} SuperNodes, {rounds} rounds ...", flush=True)
    totals["deployment"], idle_cores = in_deployment(args.out / "deployment", nodes, rounds)
    print(f"in all: {totals}", flush=True)
    rounds_of = {mode: json.loads((args.out / mode / "results.json").read_text())["rounds"]
                 for mode in totals}
    text = report_text(nodes, rounds, totals, rounds_of, start_seconds, idle_cores)
    print(text)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text)


if __name__ == "__main__":
    main()
