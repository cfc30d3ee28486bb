"""Experiments through Flower's simulation engine, from Python or the command line.

`flwr run .` is the way for a person; this is the way for programs (the benchmark harness,
the tests): the same ServerApp logic and ClientApp, run by `flwr.simulation.run_simulation`
with run configs given directly instead of through a SuperLink. Several experiments can run
one after another on the same simulated federation, paying the engine's start-up once; one
that fails is logged and the next one starts.

    python -m fedhpro_lab.simulation --supernodes 10 --run-config '[{"strategy": "fedavg"}]'
"""

from __future__ import annotations

import argparse
import json
import sys
from logging import ERROR
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parents[1]  # where pyproject.toml and conf/ live


def simulate(run_configs: list[dict[str, Any]], num_supernodes: int, app_dir: Path = APP_DIR,
             cpus_per_client: float = 1.0, gpus_per_client: float = 0.0,
             client_app: Any = None) -> None:
    """Run the experiments the run configs describe (Flower run-config keys), in order, on
    `num_supernodes` simulated SuperNodes; each writes to its own `out-dir`. `client_app`
    replaces the app's ClientApp (tests use one that misbehaves)."""
    from flwr.common.logger import log
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    if client_app is None:
        from client_app import app as client_app

    from fedhpro_flwr.app.server import RUN_STOPPERS, run_server

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        for run_config in run_configs:
            try:
                run_server(grid, run_config, app_dir)
            except Exception as exc:  # recorded by the caller from this line; go on
                kind = "" if isinstance(exc, RUN_STOPPERS) else f"{type(exc).__name__}: "
                log(ERROR, "fedhpro-flwr: run %s failed: %s%s", run_config.get("out-dir", ""),
                    kind, exc)

    resources = {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}
    run_simulation(server_app, client_app, num_supernodes=num_supernodes,
                   backend_config={"client_resources": resources})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedhpro_lab.simulation",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", required=True,
                        help="JSON list of run configs (objects of run-config keys)")
    parser.add_argument("--supernodes", type=int, required=True)
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    parser.add_argument("--attack", default="",
                        help="KIND:CLIENTS[:FACTOR]: the first CLIENTS partitions lie "
                             "(fedhpro_lab.attacks)")
    args = parser.parse_args(argv)
    client_app = None
    if args.attack:
        from fedhpro_lab.attacks import Attack, attacking_app

        client_app = attacking_app(Attack.parse(args.attack))
    simulate(json.loads(args.run_config), args.supernodes, cpus_per_client=args.cpus_per_client,
             gpus_per_client=args.gpus_per_client, client_app=client_app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
