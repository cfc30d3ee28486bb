"""Every reply is filed under the node its message was sent to, error replies included.

The round's messages go out through Flower's own in-memory grid and link state (what the
simulation engine runs on); one node stops sending heartbeats, so the link state itself
answers for it with Flower's "Node Unavailable" error reply, sent under the SuperLink's own
node id. The other replies are built as the SuperNode builds them: a trained reply, a crashed
ClientApp's error reply, a reply with a bad payload, and none at all.
The bug this guards against: the unavailable node was filed under node 1 and then listed
again as silent.
"""

import time

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from replies import DEAD, LIVE, grid_with_nodes, trained

from fedhpro_flwr.methods import parse_experiment
from fedhpro_flwr.methods.payload import tensors_to_record
from fedhpro_flwr.methods.strategy import ExperimentStrategy

STATE = {"w": torch.zeros(3)}
pytestmark = pytest.mark.usefixtures("serverapp_identity")
CFG = parse_experiment({"federation": {"min_train_nodes": 5, "round_timeout": 30}})


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
