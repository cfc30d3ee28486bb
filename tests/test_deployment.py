"""Deployment with real processes on 127.0.0.1: `flower-superlink`, two or three
`flower-supernode`s and `flwr run`, as docs/deployment.md shows them; insecure, then with TLS
and SuperNode authentication; a dead SuperNode and a restarted SuperLink. Every process is
stopped by its PID at the end, pass or fail."""

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from simulate import assert_same_run

from fedhpro_lab.localfed import CONNECTION, FINISHED, Credentials, LocalFederation

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).resolve().parents[1]
NODES = [f"partition-id={i} num-partitions=2" for i in range(2)]
COMPLETED = f"{FINISHED}:completed"


def run_config(out: Path, rounds: int, extra: str = "", partitions: int = 2, **keys) -> dict:
    return {"config": "conf/mnist-dir0.5.yaml", "num-server-rounds": rounds,
            "out-dir": str(out), **keys,
            "overrides": f"partition.num_partitions={partitions} train.local_epochs=1 "
                         f"{extra}".strip()}


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def rounds_done(out: Path) -> int:
    try:
        return len(results(out)["rounds"])
    except (OSError, ValueError):  # not written yet
        return 0


def wait_until(done: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} not within {timeout:.0f} s"
        time.sleep(0.5)


def wait_for_round(out: Path, round_: int, timeout: float = 300) -> None:
    wait_until(lambda: rounds_done(out) >= round_, f"round {round_} recorded in {out}", timeout)


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


def test_a_killed_serverapp_resumes_to_the_uninterrupted_result(straight, tmp_path):
    # a federation of its own: a node can still start a ClientApp for the stopped run after
    # the cleanup below (it logs the message as ignored, then starts one), and in two full
    # test runs such a ClientApp held its node for 10 minutes, failing the next tests
    out = tmp_path / "out"
    with LocalFederation(tmp_path / "fed", NODES) as federation:
        run_id = federation.submit(APP_DIR, run_config(out, rounds=2))
        wait_for_round(out, 1)
        # one round-2 ClientApp frozen: a stopped run's ClientApp that never ends (seen in CI, still
        # running 300 s after the stop); a node handles one message at a time, so it holds its node
        wait_until(lambda: bool(federation.clientapp_pids()), "a round-2 ClientApp", 120)
        frozen = federation.clientapp_pids()[0]
        os.kill(frozen, signal.SIGSTOP)
        pids = federation.serverapp_pids()
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # no chance to clean up
        federation.flwr("stop", str(run_id), CONNECTION)  # as an operator would
        status = federation.wait(run_id, timeout=60)
        assert status != COMPLETED and rounds_done(out) == 1
        # the operator stops what is still running of the stopped run, and the nodes serve the next
        assert frozen in federation.end_clientapps(grace=30)
        assert not federation.clientapp_pids()

        assert federation.run(APP_DIR, run_config(out, rounds=2, resume=True)) == COMPLETED
        assert_same_run(out, straight[1])

        # the checkpoint now belongs to this config: another one is refused, nothing is touched
        run_id = federation.submit(APP_DIR, run_config(out, rounds=3, resume=True,
                                                       extra="train.lr=0.5"))
        assert federation.wait(run_id, timeout=120) == f"{FINISHED}:failed"
        message = "was written with another experiment config"
        assert message in federation.details(run_id)
        assert message in federation.logs(run_id)
        assert rounds_done(out) == 2


def test_personal_models_outlive_the_flower_run_on_the_nodes_disks(federation, tmp_path):
    """A resumed experiment is a new Flower run, whose nodes start with empty states: the
    clients' personal models come back from their disks, and the run replays an
    uninterrupted one."""
    hetero = "model.backbones=cnn-8,cnn-16"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert federation.run(APP_DIR, run_config(straight, rounds=2, extra=hetero,
                                              strategy="fedproto")) == COMPLETED
    assert federation.run(APP_DIR, run_config(resumed, rounds=1, extra=hetero,
                                              strategy="fedproto")) == COMPLETED
    assert federation.run(APP_DIR, run_config(resumed, rounds=2, extra=hetero,
                                              strategy="fedproto", resume=True)) == COMPLETED
    assert results(resumed)["rounds"][1]["client_models_restored"] == 2
    assert_same_run(resumed, straight)


def test_a_hung_node_is_left_out_after_the_round_timeout(federation, tmp_path):
    # the timeout must come before the SuperLink declares the stopped node unavailable (no
    # heartbeat for 2 of its 30 s intervals: 36-60 s after it stops), or that is the reason,
    # and after the healthy node's round (a fresh ClientApp process: 20 s was too short for it
    # on a loaded machine)
    run_id = federation.submit(APP_DIR, run_config(
        tmp_path, rounds=2, extra="federation.round_timeout=30 federation.min_replies=1"))
    wait_for_round(tmp_path, 1)
    federation.pause_node(1)
    try:
        assert federation.wait(run_id, timeout=300) == COMPLETED
    finally:
        federation.resume_node(1)
    first, second = results(tmp_path)["rounds"]
    assert first["participants"] == [0, 1]
    assert second["participants"] == [0] and len(second["left_out"]) == 1
    assert "no reply within federation.round_timeout = 30 s" in second["left_out"][0]["reason"]
    assert second["wall_seconds"] >= 30


def test_a_killed_node_is_left_out_once_as_unavailable(tmp_path):
    # Flower 1.42's SuperNode sends a heartbeat every ~24 s for a fixed 30 s interval (no CLI
    # option); the SuperLink answers for a node silent for 2 intervals with a "Node
    # Unavailable" error reply, so round 2 ends up to a minute after the kill
    out = tmp_path / "out"
    nodes = [f"partition-id={i} num-partitions=3" for i in range(3)]
    with LocalFederation(tmp_path / "fed", nodes) as fed:
        wait_until(lambda: len(online_nodes(fed)) == 3, "3 SuperNodes online", 60)
        run_id = fed.submit(APP_DIR, run_config(out, rounds=3, partitions=3,
                                                extra="federation.round_timeout=600"))
        wait_for_round(out, 1)
        # round 2's message has reached node 1, which now trains: kill it mid-round
        wait_until(lambda: fed.node_log(1).count("Receiving: train message") >= 2,
                   "round 2 at SuperNode 1")
        dead = fed.node_id(1)
        fed.kill_node(1)
        assert fed.wait(run_id, timeout=600) == COMPLETED
        assert dead not in online_nodes(fed) and len(online_nodes(fed)) == 2
    first, second, third = results(out)["rounds"]
    assert first["participants"] == [0, 1, 2] and first["left_out"] == []
    assert second["participants"] == [0, 2] and second["failures"] == 1
    assert second["left_out"] == [
        {"node": dead, "reason": "node unavailable: no heartbeat reached the SuperLink in time"}]
    # the SuperLink no longer counts the dead node as connected: it is not sampled again
    assert third["participants"] == [0, 2] and third["left_out"] == []


def online_nodes(fed: LocalFederation) -> set[int]:
    """The node ids the SuperLink lists as online."""
    listed = json.loads(fed.flwr("supernode", "ls", CONNECTION, "--format", "json"))
    return {int(n["node-id"]) for n in listed["nodes"] if n["status"] == "online"}


def test_a_killed_superlink_restarts_and_the_run_resumes_to_the_same_result(straight, tmp_path):
    # the SuperLink keeps runs and nodes in its database: after the restart the SuperNodes
    # reconnect under their node ids; the interrupted run is stopped and a resume continues
    # from the ServerApp's checkpoint of round 1
    out = tmp_path / "out"
    with LocalFederation(tmp_path / "fed", NODES, database=tmp_path / "superlink.db") as fed:
        run_id = fed.submit(APP_DIR, run_config(out, rounds=2))
        wait_for_round(out, 1)
        fed.kill_superlink()  # with its ServerApp, during round 2
        fed.start_superlink()
        assert fed.status(run_id) == "running"  # as the database last knew it
        fed.flwr("stop", str(run_id), CONNECTION)
        assert fed.status(run_id) == f"{FINISHED}:stopped" and rounds_done(out) == 1
        assert fed.run(APP_DIR, run_config(out, rounds=2, resume=True)) == COMPLETED
        assert all(node.poll() is None for node in fed.supernodes)  # never restarted
    assert_same_run(out, straight[1])


def test_tls_and_supernode_authentication_with_and_without_privacy(tmp_path):
    credentials = Credentials.create(tmp_path / "credentials", num_nodes=2)
    private = "privacy.noise_multiplier=1.0 privacy.stats_noise_multiplier=4.0"
    with LocalFederation(tmp_path / "fed", NODES, credentials) as fed:
        status = fed.run(APP_DIR, run_config(tmp_path / "out", rounds=2))
        listed = json.loads(fed.flwr("supernode", "ls", CONNECTION, "--format", "json"))
        run_id = fed.submit(APP_DIR, run_config(tmp_path / "private", rounds=2, extra=private))
        private_status, log = fed.wait(run_id, 600), fed.logs(run_id)
    assert status == COMPLETED
    assert [r["participants"] for r in results(tmp_path / "out")["rounds"]] == [[0, 1]] * 2
    assert len(listed["nodes"]) == 2
    # FedHPro with DP on both SuperNodes: epsilon grows each round; each node's own ledger
    assert private_status == COMPLETED
    recorded = results(tmp_path / "private")
    epsilons = [r["epsilon"] for r in recorded["rounds"]]
    assert 0 < epsilons[0] < epsilons[1] == recorded["privacy"]["epsilon"]
    assert set(recorded["privacy"]["clients"]) == {"0", "1"}
    assert f"[round 2/2] privacy: epsilon {epsilons[1]:.3f}" in log


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
