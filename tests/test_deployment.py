"""Deployment with real processes on 127.0.0.1: `flower-superlink`, two `flower-supernode`s
and `flwr run`, as docs/deployment.md shows them; insecure, then with TLS and SuperNode
authentication. Every process is stopped by its PID at the end, pass or fail."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from simulate import assert_same_run

from fedhpro_lab.localfed import CONNECTION, FINISHED, Credentials, LocalFederation

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).resolve().parents[1]
NODES = [f"partition-id={i} num-partitions=2" for i in range(2)]
COMPLETED = f"{FINISHED}:completed"


def run_config(out: Path, rounds: int, extra: str = "", **keys) -> dict:
    return {"config": "conf/mnist-dir0.5.yaml", "num-server-rounds": rounds,
            "out-dir": str(out), **keys,
            "overrides": f"partition.num_partitions=2 train.local_epochs=1 {extra}".strip()}


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def rounds_done(out: Path) -> int:
    try:
        return len(results(out)["rounds"])
    except (OSError, ValueError):  # not written yet
        return 0


def wait_for_round(out: Path, round_: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while rounds_done(out) < round_:
        assert time.monotonic() < deadline, f"round {round_} not recorded in {out}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("insecure"), NODES) as fed:
        yield fed


@pytest.fixture(scope="module")
def straight(federation, tmp_path_factory):
    """An uninterrupted 2-round FedHPro run: its status and out-dir."""
    out = tmp_path_factory.mktemp("straight")
    return federation.run(APP_DIR, run_config(out, rounds=2)), out


def test_fedhpro_runs_through_flwr_run(straight):
    status, out = straight
    assert status == COMPLETED
    recorded = results(out)
    assert [r["round"] for r in recorded["rounds"]] == [1, 2]
    for row in recorded["rounds"]:
        assert row["participants"] == [0, 1] and row["left_out"] == []
    assert recorded["final_accuracy"] > 0.3  # chance is 0.1


def test_a_killed_serverapp_resumes_to_the_uninterrupted_result(federation, straight, tmp_path):
    run_id = federation.submit(APP_DIR, run_config(tmp_path, rounds=2))
    wait_for_round(tmp_path, 1)
    pids = federation.serverapp_pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # no chance to clean up
    federation.flwr("stop", str(run_id), CONNECTION)  # as an operator would
    status = federation.wait(run_id, timeout=60)
    assert status != COMPLETED and rounds_done(tmp_path) == 1

    assert federation.run(APP_DIR, run_config(tmp_path, rounds=2, resume=True)) == COMPLETED
    assert_same_run(tmp_path, straight[1])

    # the checkpoint now belongs to this config: another one is refused, nothing is touched
    run_id = federation.submit(APP_DIR, run_config(tmp_path, rounds=3, resume=True,
                                                   extra="train.lr=0.5"))
    assert federation.wait(run_id, timeout=120) == f"{FINISHED}:failed"
    message = "was written with another experiment config"
    assert message in federation.details(run_id)
    assert message in federation.logs(run_id)
    assert rounds_done(tmp_path) == 2


def test_a_hung_node_is_left_out_after_the_round_timeout(federation, tmp_path):
    run_id = federation.submit(APP_DIR, run_config(
        tmp_path, rounds=2, extra="federation.round_timeout=40 federation.min_replies=1"))
    wait_for_round(tmp_path, 1)
    federation.pause_node(1)
    try:
        assert federation.wait(run_id, timeout=300) == COMPLETED
    finally:
        federation.resume_node(1)
    first, second = results(tmp_path)["rounds"]
    assert first["participants"] == [0, 1]
    assert second["participants"] == [0] and len(second["left_out"]) == 1
    assert "no reply within federation.round_timeout = 40 s" in second["left_out"][0]["reason"]
    assert second["wall_seconds"] >= 40


def test_tls_and_supernode_authentication(tmp_path):
    credentials = Credentials.create(tmp_path / "credentials", num_nodes=2)
    with LocalFederation(tmp_path / "fed", NODES, credentials) as fed:
        status = fed.run(APP_DIR, run_config(tmp_path / "out", rounds=2))
        listed = json.loads(fed.flwr("supernode", "ls", CONNECTION, "--format", "json"))
    assert status == COMPLETED
    assert [r["participants"] for r in results(tmp_path / "out")["rounds"]] == [[0, 1]] * 2
    assert len(listed["nodes"]) == 2


def test_heterogeneous_nodes_keep_their_models_between_rounds(tmp_path):
    # each SuperNode names its own backbone; the SuperNode keeps the ClientApp's context
    # state between rounds, so round 2 starts from each node's model of round 1
    nodes = [f"partition-id={i} num-partitions=2 backbone='{b}'"
             for i, b in enumerate(("cnn-8", "resnet10-4"))]
    out = tmp_path / "hetero"
    with LocalFederation(tmp_path / "fed", nodes) as fed:
        status = fed.run(APP_DIR, run_config(out, rounds=2, extra="model.backbones=cnn-16"))
    assert status == COMPLETED
    first, second = results(out)["rounds"]
    assert sorted(first["client_accuracies"]) == ["0", "1"]
    assert first["client_models_restored"] == 0 and second["client_models_restored"] == 2
