"""One experiment through Flower's simulation engine, from Python or the command line.

`flwr run .` is the way for a person; this is the way for programs (the benchmark harness,
the tests): the same ServerApp logic and ClientApp, run by `flwr.simulation.run_simulation`
with the run config given directly instead of through a SuperLink.

    python -m fedhpro_flwr.simulation --supernodes 10 --run-config '{"strategy": "fedavg"}'
"""

from __future__ import annotations

import argparse
import json
import sys
from logging import ERROR
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parents[1]  # where pyproject.toml and conf/ live


def simulate(run_config: dict[str, Any], num_supernodes: int, app_dir: Path = APP_DIR,
             cpus_per_client: float = 1.0, gpus_per_client: float = 0.0) -> None:
    """Run the experiment `run_config` describes (Flower run-config keys) on
    `num_supernodes` simulated SuperNodes; results go to its `out-dir`."""
    from flwr.common.logger import log
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client_app import app as client_app

    from .config import ConfigError
    from .server import run_server

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            run_server(grid, run_config, app_dir)
        except ConfigError as exc:
            log(ERROR, "fedhpro-flwr: %s", exc)
            raise

    resources = {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}
    run_simulation(server_app, client_app, num_supernodes=num_supernodes,
                   backend_config={"client_resources": resources})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedhpro_flwr.simulation",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", required=True, help="JSON object of run-config keys")
    parser.add_argument("--supernodes", type=int, required=True)
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    args = parser.parse_args(argv)
    simulate(json.loads(args.run_config), args.supernodes, cpus_per_client=args.cpus_per_client,
             gpus_per_client=args.gpus_per_client)
    return 0


if __name__ == "__main__":
    sys.exit(main())
