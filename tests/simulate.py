"""Run the real ServerApp and ClientApps through Flower's simulation engine, for tests."""

import json
from pathlib import Path

import torch

from fedhpro_flwr.app.checkpoint import CHECKPOINT_NAME
from fedhpro_lab.simulation import simulate as run_experiment

NUM_CLIENTS = 3
CONFIG = "conf/mnist-dir0.5.yaml"  # small and quick
OVERRIDES = f"partition.num_partitions={NUM_CLIENTS} train.local_epochs=2"
# two of the three clients a round (int(3 * 0.67) = 2), drawn from the seed and the round
PARTIAL = f"{OVERRIDES} federation.fraction_train=0.67"


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


def timing(key: str) -> bool:
    """Fields that measure the clock, the one thing two identical runs do not share."""
    return "seconds" in key or key == "client-started"


def assert_same_tensors(a: dict, b: dict, where: str = "") -> None:
    """Nested dicts of tensors, equal bit for bit."""
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key], f"{where}{key}.")
        else:
            assert torch.equal(a[key], b[key]), f"{where}{key}"


def assert_same_run(out_a: Path, out_b: Path) -> None:
    """Two runs ended in the same state, bit for bit: weights, the strategy's state (e.g.
    hyper-prototypes, its generators), torch's global RNG and every results row but its clock
    readings (so also which partitions trained). No tolerance: a resumed run must replay the
    uninterrupted one."""
    a, b = checkpoint(out_a), checkpoint(out_b)
    assert a["round"] == b["round"]
    assert_same_tensors(a["weights"], b["weights"], "weights.")
    assert_same_tensors(a["strategy_state"], b["strategy_state"], "strategy_state.")
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    rows_a, rows_b = (json.loads((out / "results.json").read_text())["rounds"]
                      for out in (out_a, out_b))
    assert [{k: v for k, v in r.items() if not timing(k)} for r in rows_a] == [
        {k: v for k, v in r.items() if not timing(k)} for r in rows_b]
