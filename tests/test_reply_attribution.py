"""Every reply is filed under the node its message was sent to, error replies included.

The round's messages go out through Flower's own in-memory grid and link state (what the
simulation engine runs on); one node stops sending heartbeats, so the link state itself
answers for it with Flower's "Node Unavailable" error reply, sent under the SuperLink's own
node id. The other replies are built as the SuperNode builds them: a trained reply, a crashed
ClientApp's error reply, a reply with a bad payload, and none at all.
The bug this guards against: the unavailable node was filed under node 1 and then listed
again as silent.
"""

import secrets
import time

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedhpro_flwr.methods import parse_experiment
from fedhpro_flwr.methods.payload import tensors_to_record
from fedhpro_flwr.methods.strategy import ExperimentStrategy

STATE = {"w": torch.zeros(3)}
LIVE, DEAD = 3600.0, 0.01  # heartbeat intervals, seconds
pytestmark = pytest.mark.usefixtures("serverapp_identity")
CFG = parse_experiment({"federation": {"min_train_nodes": 5, "round_timeout": 30}})


def grid_with_nodes(intervals: list[float]) -> tuple[InMemoryGrid, list[int]]:
    """Flower's in-memory grid over a link state holding one node per heartbeat interval,
    registered as the simulation engine registers its nodes."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=1)
    run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=run.run_id)
    nodes = []
    for interval in intervals:
        node = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32),
                                 heartbeat_interval=interval)
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=interval)
        nodes.append(node)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, nodes


def trained(message: Message, partition: int, weights: torch.Tensor) -> Message:
    metrics = MetricRecord({"num-examples": 10, "partition-id": partition,
                            "client-seconds": 1.0, "train_loss": 0.5})
    content = RecordDict({"arrays": tensors_to_record({"w": weights}), "metrics": metrics})
    return Message(content, reply_to=message)


def test_each_reply_is_filed_under_the_node_it_answers(caplog):
    grid, nodes = grid_with_nodes([LIVE, LIVE, DEAD, LIVE, LIVE])
    strategy = ExperimentStrategy(CFG, STATE)
    messages = list(strategy.configure_train(1, tensors_to_record(STATE), ConfigRecord(), grid))
    sent = {m.metadata.dst_node_id: m for m in messages}
    assert sorted(sent) == sorted(nodes)
    ids = grid.push_messages(messages)  # gives every message its id, as in a round
    ok, crashed, dead, bad, silent = nodes
    time.sleep(0.1)  # the dead node's heartbeat has lapsed
    (unavailable,) = grid.pull_messages(ids)  # the link state answers for the dead node
    assert unavailable.metadata.src_node_id == SUPERLINK_NODE_ID
    assert unavailable.error.code == ErrorCode.NODE_UNAVAILABLE
    replies = [
        trained(sent[ok], 0, torch.ones(3)),
        Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                      "<class 'RuntimeError'>:<'out of memory'>"), reply_to=sent[crashed]),
        unavailable,
        trained(sent[bad], 3, torch.full((3,), float("nan"))),
        # the same verdict once more, as a later pull would give it: counted once
        create_message_error_unavailable_res_message(sent[dead].metadata, "node_unavail"),
    ]

    strategy.aggregate_train(1, replies)

    row = strategy.report.row()
    assert row["participants"] == [0] and row["clients"] == 1
    assert row["failures"] == 4
    assert {entry["node"]: entry["reason"] for entry in row["left_out"]} == {
        crashed: "client crashed: <class 'RuntimeError'>:<'out of memory'>",
        dead: "node unavailable: no heartbeat reached the SuperLink in time",
        bad: "invalid reply, rejected: model weights: array 'w' contains NaN or Inf",
        silent: "no reply within federation.round_timeout = 30 s",
    }
    assert f"a second reply for node {dead} ignored" in caplog.text
