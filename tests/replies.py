"""Rounds without a federation: Flower's own in-memory grid and link state (what the simulation
engine runs on) with registered nodes, and training replies built as a SuperNode builds them."""

import secrets

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedhpro_flwr.methods.payload import tensors_to_record

LIVE, DEAD = 3600.0, 0.01  # heartbeat intervals, seconds


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


def trained(message: Message, partition: int, weights: torch.Tensor,
            extra: dict | None = None) -> Message:
    """A trained reply with weights `w` (and extra records, a method's payload)."""
    metrics = MetricRecord({"num-examples": 10, "partition-id": partition,
                            "client-seconds": 1.0, "train_loss": 0.5})
    content = RecordDict({"arrays": tensors_to_record({"w": weights}), "metrics": metrics,
                          **(extra or {})})
    return Message(content, reply_to=message)
