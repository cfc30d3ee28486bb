"""Which nodes a round trains: partitions drawn from (seed, round), whatever the node ids.

The unit tests drive the sampler, the partition query (answered by the real ClientApp
handler) and the Strategy's sampling on a grid stand-in; the slow test runs the real
simulation engine twice, with fresh random node ids each time, and resumes a run.
"""

import json
import secrets
from collections import Counter
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from simulate import CONFIG, assert_same_run

from fedhpro_flwr.app.client import handle_query
from fedhpro_flwr.config import ConfigError
from fedhpro_flwr.methods import parse_experiment
from fedhpro_flwr.methods.sampling import (
    NUM_PARTITIONS_KEY,
    PARTITION_KEY,
    QUERY_RECORD,
    sample_partitions,
    sample_size,
)
from fedhpro_flwr.methods.strategy import ExperimentStrategy
from fedhpro_lab.simulation import simulate as run_experiments

STATE = {}  # the sampling needs no model


def experiment(num_partitions: int = 4, fraction: float = 0.5, seed: int = 7):
    return parse_experiment({"seed": seed, "partition": {"num_partitions": num_partitions},
                             "federation": {"fraction_train": fraction, "round_timeout": 5}})


class AnsweringGrid:
    """A grid whose nodes answer as a SuperNode running the ClientApp would: node id ->
    node config, or None for a node that never answers."""

    def __init__(self, nodes: dict[int, dict | None]):
        self.nodes = nodes
        self.asked: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex  # as a grid sets it
            node = message.metadata.dst_node_id
            self.asked.append(node)
            config = self.nodes[node]
            if config is None:
                continue
            context = Context(run_id=1, node_id=node, node_config=config, state=RecordDict(),
                              run_config={})
            try:
                replies.append(handle_query(message, context))
            except Exception as exc:  # the SuperNode's error reply
                replies.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                             f"{type(exc)}:<'{exc}'>"), reply_to=message))
        return replies


def federation(partitions, num_partitions: int = 4) -> AnsweringGrid:
    """One node per partition id, under fresh random node ids (as every SuperNode start)."""
    return AnsweringGrid({secrets.randbits(62): {"partition-id": p,
                                                 "num-partitions": num_partitions}
                          for p in partitions})


def sampled_partitions(strategy: ExperimentStrategy, grid: AnsweringGrid, round_: int):
    return [grid.nodes[node]["partition-id"] for node in strategy.sample(round_, grid)]


# ---- the sampler ------------------------------------------------------------------------

def test_sample_size_follows_flowers_rule():
    assert sample_size(10, 0.5, 2) == 5
    assert sample_size(3, 0.67, 2) == 2  # rounded down
    assert sample_size(3, 0.1, 2) == 2  # at least min_train_nodes
    assert sample_size(4, 1.0, 2) == 4


def test_a_rounds_sample_depends_on_seed_round_and_available_partitions_only():
    first = sample_partitions(536, 3, range(10), 4)
    assert first == sample_partitions(536, 3, [9, 3, 0, 1, 2, 4, 5, 6, 7, 8, 3], 4)
    assert len(first) == 4 and first == sorted(first) and set(first) <= set(range(10))
    # pinned: results of earlier runs stay reproducible
    assert sample_partitions(536, 1, range(10), 3) == [1, 5, 7]
    rounds = {tuple(sample_partitions(536, r, range(10), 4)) for r in range(1, 21)}
    assert len(rounds) > 10  # rounds differ (210 subsets of 4 of 10)
    assert [sample_partitions(537, r, range(10), 4) for r in range(1, 6)] != [
        sample_partitions(536, r, range(10), 4) for r in range(1, 6)]  # seeds differ
    assert sample_partitions(536, 3, [2, 5, 7], 4) == [2, 5, 7]  # fewer than asked: all
    # a partition not connected is replaced by the next in rank; the others stay
    missing = first[0]
    without = sample_partitions(536, 3, [p for p in range(10) if p != missing], 4)
    assert len(set(without) & set(first)) == 3 and missing not in without


def test_every_partition_is_sampled_about_equally_often():
    counts = Counter(p for r in range(1, 401) for p in sample_partitions(0, r, range(10), 3))
    assert sorted(counts) == list(range(10))
    assert all(80 <= n <= 160 for n in counts.values()), counts  # 120 expected


# ---- the partition query and the Strategy's sampling ----------------------------------------

@pytest.mark.usefixtures("serverapp_identity")
def test_the_client_names_its_partition_and_checks_the_federation():
    message = Message(RecordDict({QUERY_RECORD: ConfigRecord({NUM_PARTITIONS_KEY: 4})}),
                      dst_node_id=5, message_type="query")
    message.metadata.__dict__["_message_id"] = uuid4().hex

    def ask(node_config):
        context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(),
                          run_config={})
        return handle_query(message, context).content.config_records[QUERY_RECORD]

    assert ask({"partition-id": 2, "num-partitions": 4})[PARTITION_KEY] == 2
    assert ask({"partition-id": 9, "data-dir": "/data"})[PARTITION_KEY] == 9
    with pytest.raises(ConfigError, match="num-partitions=3"):
        ask({"partition-id": 2, "num-partitions": 3})


@pytest.mark.usefixtures("serverapp_identity")
def test_two_federations_of_one_seed_sample_the_same_partitions():
    one, other = federation(range(4)), federation([3, 1, 0, 2])
    a, b = ExperimentStrategy(experiment(), STATE), ExperimentStrategy(experiment(), STATE)
    for round_ in range(1, 6):
        expected = sample_partitions(7, round_, range(4), 2)
        assert sampled_partitions(a, one, round_) == expected
        assert sampled_partitions(b, other, round_) == expected
    assert sorted(one.asked) == sorted(one.nodes)  # each node asked once, then remembered


@pytest.mark.usefixtures("serverapp_identity")
def test_full_participation_asks_nobody():
    grid = federation(range(4))
    assert ExperimentStrategy(experiment(fraction=1.0), STATE).sample(1, grid) == sorted(
        grid.nodes)
    # a fraction whose sample covers every node anyway: int(2 * 0.6) = 1, min_train_nodes 2
    small = federation(range(2), 2)
    assert ExperimentStrategy(experiment(num_partitions=2, fraction=0.6), STATE).sample(
        1, small) == sorted(small.nodes)
    assert grid.asked == [] == small.asked


@pytest.mark.usefixtures("serverapp_identity")
def test_nodes_that_do_not_answer_are_left_out_and_asked_again(caplog):
    grid = federation(range(3))
    silent, wrong = secrets.randbits(62), secrets.randbits(62)
    grid.nodes[silent] = None
    grid.nodes[wrong] = {"partition-id": 3, "num-partitions": 5}  # not this experiment's
    strategy = ExperimentStrategy(experiment(num_partitions=4, fraction=0.5), STATE)
    assert sampled_partitions(strategy, grid, 1) == sample_partitions(7, 1, range(3), 2)
    assert f"node {silent} left out of sampling: no answer to the partition query" in caplog.text
    assert f"node {wrong} left out of sampling: partition query failed: client crashed:" \
        in caplog.text and "num-partitions=5" in caplog.text
    strategy.sample(2, grid)
    assert Counter(grid.asked)[silent] == 2 and Counter(grid.asked)[wrong] == 2
    assert max(Counter(grid.asked).values()) == 2


@pytest.mark.usefixtures("serverapp_identity")
def test_too_few_answers_sample_what_answered(caplog):
    grid = federation(range(2))
    grid.nodes |= {secrets.randbits(62): None, secrets.randbits(62): None}
    strategy = ExperimentStrategy(experiment(fraction=0.75), STATE)  # 3 of 4
    assert sampled_partitions(strategy, grid, 1) == [0, 1]
    assert "sampling 2 nodes, not 3: only 2 of 4 connected nodes told their partition" \
        in caplog.text


@pytest.mark.usefixtures("serverapp_identity")
def test_two_nodes_with_one_partition_are_left_out_and_asked_again(caplog):
    grid = federation(range(4))
    twin = secrets.randbits(62)
    grid.nodes[twin] = {"partition-id": 2, "num-partitions": 4}
    first = next(node for node, config in grid.nodes.items()
                 if config["partition-id"] == 2 and node != twin)
    strategy = ExperimentStrategy(experiment(fraction=0.75), STATE)
    assert 2 not in sampled_partitions(strategy, grid, 1)
    assert (f"nodes {min(first, twin)}, {max(first, twin)} all name partition-id 2: left out"
            in caplog.text)
    del grid.nodes[twin]  # the stale node id goes offline
    assert sampled_partitions(strategy, grid, 2) == sample_partitions(7, 2, range(4), 3)


# ---- the real simulation engine -------------------------------------------------------------

NUM_CLIENTS = 4
HALF = (f"partition.num_partitions={NUM_CLIENTS} train.local_epochs=1 "
        "federation.fraction_train=0.5")


def participants(out) -> list[list[int]]:
    rows = json.loads((out / "results.json").read_text())["rounds"]
    return [row["participants"] for row in rows]


@pytest.mark.slow
def test_runs_of_one_seed_sample_the_same_partitions_and_resume_exactly(tmp_path):
    """Two engine starts (fresh random node ids): a straight run and the first round of an
    interrupted one, then its resumption and a second straight run."""
    straight, again, resumed = tmp_path / "straight", tmp_path / "again", tmp_path / "resumed"

    def run(out, rounds, resume=False):
        return {"strategy": "fedhpro", "config": CONFIG, "num-server-rounds": rounds,
                "out-dir": str(out), "resume": resume, "overrides": HALF}

    run_experiments([run(straight, 3), run(resumed, 1)], NUM_CLIENTS)
    run_experiments([run(resumed, 3, resume=True), run(again, 3)], NUM_CLIENTS)

    seed = json.loads((straight / "results.json").read_text())["config"]["seed"]
    expected = [sample_partitions(seed, r, range(NUM_CLIENTS), 2) for r in (1, 2, 3)]
    assert len({tuple(p) for p in expected}) > 1  # the sample changes between rounds
    assert participants(straight) == participants(again) == participants(resumed) == expected
    assert_same_run(straight, again)
    assert_same_run(straight, resumed)
