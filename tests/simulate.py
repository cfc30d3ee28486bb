"""Run the real ServerApp and ClientApps through Flower's simulation engine, for tests."""

import json
from pathlib import Path

import torch
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from client_app import app as client_app
from fedhpro_flwr.checkpoint import CHECKPOINT_NAME
from fedhpro_flwr.server import run_server

ROOT = Path(__file__).resolve().parents[1]
NUM_CLIENTS = 3
CONFIG = "conf/mnist-dir0.5.yaml"  # small and quick
OVERRIDES = f"partition.num_partitions={NUM_CLIENTS} train.local_epochs=2"


def simulate(out_dir: Path, rounds: int, resume: bool = False, strategy: str = "fedhpro",
             config: str = CONFIG, overrides: str = OVERRIDES,
             num_clients: int = NUM_CLIENTS) -> dict:
    """Run `rounds` rounds with `num_clients` SuperNodes; return results.json."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        run_config = {"strategy": strategy, "config": config, "num-server-rounds": rounds,
                      "out-dir": str(out_dir), "resume": resume, "overrides": overrides}
        run_server(grid, run_config, ROOT)

    run_simulation(server_app, client_app, num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return json.loads((out_dir / "results.json").read_text())


def checkpoint(out_dir: Path) -> dict:
    return torch.load(out_dir / CHECKPOINT_NAME, weights_only=True)
