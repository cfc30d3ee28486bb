"""Which nodes train in a round: partitions drawn from the experiment seed and the round alone.

Flower's `FedAvg` samples node ids with Python's global `random`; node ids are random per
SuperNode start (in simulation too) and Flower draws from `random` elsewhere, so two runs of
one seed trained different clients. Here the server learns each node's partition id (a small
query message, asked once per node id) and ranks the partitions by a key hashed from
(experiment seed, round, partition): a round's sample depends only on those and on which
partitions are connected, so a resumed run needs no sampler state, and a partition that is
not connected is replaced by the next in rank while the rest of the sample stays.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedhpro_flwr.methods.payload import error_reason

QUERY_RECORD = "partition-query"  # the query's ConfigRecord, and the reply's
NUM_PARTITIONS_KEY = "num-partitions"  # asked: the experiment's partition.num_partitions
PARTITION_KEY = "partition-id"  # answered: the node's partition id


def sample_size(num_connected: int, fraction: float, min_nodes: int) -> int:
    """Flower's rule: the fraction of the connected nodes, rounded down, at least `min_nodes`."""
    return max(int(num_connected * fraction), min_nodes)


def rank_key(seed: int, round_: int, partition: int) -> bytes:
    """A partition's place in one round's ranking, from (seed, round, partition) alone."""
    return hashlib.sha256(f"fedhpro-sampling/{seed}/{round_}/{partition}".encode()).digest()


def sample_partitions(seed: int, round_: int, partitions: Iterable[int], size: int) -> list[int]:
    """The `size` first of the partition ids in the round's ranking (all if fewer), sorted."""
    pool = sorted(set(partitions), key=lambda p: rank_key(seed, round_, p))
    return sorted(pool[:size])


def wait_for_nodes(grid: Grid, minimum: int) -> list[int]:
    """The connected node ids, sorted, once at least `minimum` are connected (as Flower's
    `sample_nodes` waits)."""
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).",
            len(nodes), minimum)
        time.sleep(1)
    return nodes


def partition_of(reply: Message) -> int:
    """The partition id a query reply names (ValueError if it names none)."""
    if reply.has_error():
        raise ValueError(error_reason(reply.error))
    record = reply.content.config_records.get(QUERY_RECORD)
    value = None if record is None else record.get(PARTITION_KEY)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"reply names no partition id >= 0 (got {value!r})")
    return value


class PartitionDirectory:
    """Each node's partition id, asked once per node id and cached: a restarted SuperNode
    comes back under a new id and is asked again."""

    def __init__(self, num_partitions: int, timeout: float):
        self.num_partitions = num_partitions
        self.timeout = timeout
        self.known: dict[int, int] = {}  # node id -> partition id

    def partitions(self, grid: Grid, nodes: list[int], round_: int) -> dict[int, int]:
        """{node id: partition id} for the `nodes` that told theirs; those that fail to
        answer are logged and left out (asked again next round), and so are nodes naming the
        same partition (e.g. a SuperNode restarted under a new node id while the SuperLink
        still counts its old one): they are forgotten and asked again next round."""
        unknown = [node for node in nodes if node not in self.known]
        if unknown:
            self._ask(grid, unknown, round_)
        found = {node: self.known[node] for node in nodes if node in self.known}
        holders: dict[int, list[int]] = {}
        for node, partition in found.items():
            holders.setdefault(partition, []).append(node)
        for partition, twins in sorted(holders.items()):
            if len(twins) > 1:
                log(WARNING, "round %d: nodes %s all name partition-id %d: left out of sampling "
                    "this round and asked again next round; give every SuperNode its own "
                    "partition-id (a SuperNode restarted under a new node id counts twice until "
                    "the SuperLink marks its old id offline)", round_,
                    ", ".join(map(str, sorted(twins))), partition)
                for node in twins:
                    del found[node], self.known[node]
        return found

    def _ask(self, grid: Grid, nodes: list[int], round_: int) -> None:
        content = RecordDict({QUERY_RECORD: ConfigRecord({NUM_PARTITIONS_KEY:
                                                          self.num_partitions})})
        messages = [Message(content=content, dst_node_id=node, message_type=MessageType.QUERY)
                    for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        # message ids are set when the grid sends; a reply names the one it answers
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = set()
        for reply in replies:
            node = asked.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            answered.add(node)
            try:
                self.known[node] = partition_of(reply)
            except ValueError as exc:
                log(WARNING, "round %d: node %d left out of sampling: partition query "
                    "failed: %s", round_, node, exc)
        for node in nodes:
            if node not in answered:
                log(WARNING, "round %d: node %d left out of sampling: no answer to the "
                    "partition query within %g s", round_, node, self.timeout)
