"""Faulty clients in a real simulation: a bad reply counts exactly as no reply at all.

Seven SuperNodes; partitions 0 and 1 behave, the other five send a broken FedHPro reply
(each broken in its own way) in one run and crash in the other. Both runs must end in the
same state: the rejected replies never touch the model, the hyper-prototypes or the
checkpoint. A third run asks for more usable replies than it gets and must stop.
"""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from simulate import CONFIG, checkpoint

from fedhpro_flwr.app.client import handle_train
from fedhpro_flwr.methods.recalibrating import STATS_RECORD
from fedhpro_lab.simulation import simulate

pytestmark = pytest.mark.slow

NUM_CLIENTS = 7
GOOD = [0, 1]
FAULTS = {  # partition id -> what its node gets wrong, and the words of its rejection
    2: ("nan-weights", "contains NaN or Inf"),
    3: ("wrong-shape", "has shape"),
    4: ("float64-gradients", "has dtype float64"),
    5: ("unknown-class", "class ids"),
    6: ("negative-count", "negative class counts"),
}
OVERRIDES = f"partition.num_partitions={NUM_CLIENTS} train.local_epochs=1"


def corrupt(reply: RecordDict, fault: str) -> None:
    """Break one part of a valid FedHPro reply."""
    weights, stats = reply.array_records["arrays"], reply.array_records[STATS_RECORD]
    first = next(iter(weights))
    if fault == "nan-weights":
        broken = weights[first].numpy().copy()
        broken.flat[0] = np.nan
        weights[first] = Array(broken)
    elif fault == "wrong-shape":
        weights[first] = Array(weights[first].numpy()[:-1].copy())
    elif fault == "float64-gradients":
        stats["feature_grads"] = Array(stats["feature_grads"].numpy().astype(np.float64))
    elif fault == "unknown-class":
        classes = stats["classes"].numpy().copy()
        classes[-1] = 10  # the federation has classes 0..9
        stats["classes"] = Array(classes)
    elif fault == "negative-count":
        stats["counts"] = Array(-stats["counts"].numpy())


def faulty_client_app(crash: bool) -> ClientApp:
    """The real ClientApp, except that the nodes in FAULTS crash or corrupt their replies."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition in FAULTS and crash:
            raise RuntimeError(f"partition {partition} crashed on purpose")
        reply = handle_train(msg, context)
        if partition in FAULTS:
            corrupt(reply.content, FAULTS[partition][0])
        return reply

    return app


def run_config(out, **overrides) -> dict:
    return {"strategy": "fedhpro", "config": CONFIG, "num-server-rounds": 2,
            "out-dir": str(out), "overrides": OVERRIDES, **overrides}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    simulate([run_config(root / "broken")], NUM_CLIENTS, client_app=faulty_client_app(False))
    simulate([run_config(root / "crashed"),
              run_config(root / "too-few", overrides=OVERRIDES + " federation.min_replies=3")],
             NUM_CLIENTS, client_app=faulty_client_app(True))
    return root


def results(path) -> dict:
    return json.loads((path / "results.json").read_text())


def test_broken_replies_are_rejected_with_the_reason_logged(runs):
    rows = results(runs / "broken")["rounds"]
    assert len(rows) == 2
    for row in rows:
        assert row["participants"] == GOOD and row["clients"] == len(GOOD)
        assert row["failures"] == len(FAULTS)
        reasons = [entry["reason"] for entry in row["left_out"]]
        assert all(reason.startswith("invalid reply, rejected") for reason in reasons)
        for _, words in FAULTS.values():
            assert sum(words in reason for reason in reasons) == 1, (words, reasons)


def test_crashed_clients_are_left_out_of_the_round(runs):
    for row in results(runs / "crashed")["rounds"]:
        assert row["participants"] == GOOD and row["failures"] == len(FAULTS)
        assert all("crashed on purpose" in entry["reason"] for entry in row["left_out"])


def test_rejected_replies_leave_no_trace_in_the_global_state(runs):
    broken, crashed = results(runs / "broken"), results(runs / "crashed")
    for a, b in zip(broken["rounds"], crashed["rounds"], strict=True):
        assert a["accuracy"] == b["accuracy"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert np.isfinite([r["loss"] for r in broken["rounds"]]).all()
    state_a, state_b = checkpoint(runs / "broken"), checkpoint(runs / "crashed")
    assert state_a["round"] == state_b["round"] == 2
    for name, tensor in state_a["weights"].items():
        assert torch.equal(tensor, state_b["weights"][name]), name
    assert torch.equal(state_a["strategy_state"]["hyperprototypes"],
                       state_b["strategy_state"]["hyperprototypes"])


def test_too_few_usable_replies_stop_the_run(runs):
    out = runs / "too-few"
    stopped = results(out)
    assert stopped["rounds"] == [] and stopped["initial"]  # only the initial evaluation
    assert stopped["stopped"].startswith(
        "round 1: 2 usable replies of 7 sampled nodes, federation.min_replies is 3")
    assert stopped["stopped"].count("crashed on purpose") == len(FAULTS)
    assert not (out / "checkpoint.pt").exists()
