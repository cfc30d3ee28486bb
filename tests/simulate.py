"""Run the real ServerApp and ClientApps through Flower's simulation engine, for tests."""

import json
from pathlib import Path

import torch

from fedhpro_flwr.app.checkpoint import CHECKPOINT_NAME
from fedhpro_lab.simulation import simulate as run_experiment

NUM_CLIENTS = 3
CONFIG = "conf/mnist-dir0.5.yaml"  # small and quick
OVERRIDES = f"partition.num_partitions={NUM_CLIENTS} train.local_epochs=2"


def simulate(out_dir: Path, rounds: int, resume: bool = False, strategy: str = "fedhpro",
             config: str = CONFIG, overrides: str = OVERRIDES,
             num_clients: int = NUM_CLIENTS, client_app=None) -> dict:
    """Run `rounds` rounds with `num_clients` SuperNodes; return results.json."""
    run_experiment([{"strategy": strategy, "config": config, "num-server-rounds": rounds,
                     "out-dir": str(out_dir), "resume": resume, "overrides": overrides}],
                   num_clients, client_app=client_app)
    return json.loads((out_dir / "results.json").read_text())


def checkpoint(out_dir: Path) -> dict:
    return torch.load(out_dir / CHECKPOINT_NAME, weights_only=True)
