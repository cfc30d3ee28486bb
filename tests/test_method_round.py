"""One round of every method in this process, through the real client and strategy code.

The messages are built as Flower's strategies build them, handed to the ClientApp's handler
and the replies to the Strategy's aggregation: everything but the engine. The clients run on
the GPU when one is visible (the check for GPU SuperNodes), else on the CPU.
"""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.algorithms.training import evaluate
from fedhpro_flwr.app.client import handle_train
from fedhpro_flwr.app.sharing import sharing_for
from fedhpro_flwr.config import (
    EXPERIMENT_ID_KEY,
    STRATEGY_KEY,
    ExperimentConfig,
)
from fedhpro_flwr.data.federated import dataset_spec, held_out, held_out_data, validation_data
from fedhpro_flwr.methods import METHODS, get_method, parse_experiment
from fedhpro_flwr.methods.fedprox import MU_KEY
from fedhpro_flwr.methods.payload import EXPERIMENT_RECORD, tensors_to_record
from fedhpro_flwr.methods.recalibrating import STATS_RECORD

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_CLIENTS = 3
CFG = parse_experiment({
    "partition": {"num_partitions": NUM_CLIENTS},
    "train": {"local_epochs": 1},
    "fedtgp": {"server_epochs": 10},
    "creff": {"epochs": 20, "repeat_num": 2},
    "fedhpro": {"recal_epochs": 20},
})

# a weight of the head each method trains, where it is not the linear classifier's
HEAD = {"fednh": "classifier.scale"}  # its prototypes are the server's, not a weight

pytestmark = pytest.mark.usefixtures("serverapp_identity")


def training_message(name, strategy, arrays: ArrayRecord, node_id: int,
                     cfg: ExperimentConfig = CFG, server_round: int = 1,
                     experiment: str = "test-experiment") -> Message:
    """What `ExperimentStrategy.configure_train` sends a node (Flower adds the round)."""
    config = ConfigRecord({STRATEGY_KEY: name, "server-round": server_round,
                           EXPERIMENT_ID_KEY: experiment, **dataset_spec(cfg).to_config()})
    if name == "fedprox":
        config[MU_KEY] = strategy.proximal_mu  # what Flower's FedProx.configure_train adds
    content = RecordDict({"arrays": arrays, "config": config,
                          EXPERIMENT_RECORD: ConfigRecord(cfg.only(name).to_flat()),
                          **strategy.train_records()})
    return Message(content=content, dst_node_id=node_id, message_type="train")


def client_replies(name, strategy, model, cfg: ExperimentConfig = CFG) -> list[Message]:
    """Every client's reply to the first round's message."""
    arrays = tensors_to_record(model.state_dict())
    replies = []
    for pid in range(NUM_CLIENTS):
        node_config = {"partition-id": pid, "num-partitions": NUM_CLIENTS, "device": DEVICE}
        context = Context(run_id=1, node_id=100 + pid, node_config=node_config,
                          state=RecordDict(), run_config={})
        message = training_message(name, strategy, arrays, 100 + pid, cfg)
        replies.append(handle_train(message, context))
    return replies


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_round_of_each_method(name):
    info = dataset_spec(CFG)
    torch.manual_seed(CFG.seed)
    model = sharing_for(CFG, get_method(name)).server_model(info)  # the method's own model
    strategy = get_method(name).make_strategy(CFG, model.state_dict(), info.num_classes,
                                              model.feature_dim)
    replies = client_replies(name, strategy, model)

    new_arrays, metrics = strategy.aggregate_train(1, replies)
    assert new_arrays is not None and metrics is not None
    row = strategy.report.row()
    assert row["clients"] == NUM_CLIENTS and row["failures"] == 0
    assert row["participants"] == list(range(NUM_CLIENTS)) and row["left_out"] == []
    assert all(math.isfinite(v) for v in row.values() if isinstance(v, float | int))

    before, after = model.state_dict(), new_arrays.to_torch_state_dict()
    head = HEAD.get(name, "classifier.weight")
    assert not torch.equal(before[head], after[head])
    model.load_state_dict(after)
    model.to(DEVICE)
    scores = strategy.evaluate_model(model, held_out_data(CFG), torch.device(DEVICE))
    assert math.isfinite(scores["loss"])  # (round 1 of the re-training methods is near chance)
    held = len(held_out_data(CFG))
    for key, value in scores.items():  # shares of the held-out set: whole numbers of samples
        if key.endswith("accuracy"):
            assert value * held == pytest.approx(round(value * held), abs=1e-6), key

    state = strategy.state_dict()
    fresh = get_method(name).make_strategy(CFG, model.state_dict(), info.num_classes,
                                           model.feature_dim)
    fresh.load_state_dict(state)


def test_fedhpro_uploads_only_what_its_server_cannot_rebuild():
    """With the paper's recalibration the feature gradients stay home (the server rebuilds them
    from the bias gradients at the classifier it sent); without it the classifier gradients
    do."""
    cfg = parse_experiment({**CFG.to_dict(), "fedhpro": {"recalibration": False}})
    paper = parse_experiment({**CFG.to_dict(), "fedhpro": {"recal_source": "gradients"}})
    info = dataset_spec(cfg)
    model = build_model(cfg.model, info)
    with_recal = get_method("fedhpro").make_strategy(paper, model.state_dict(), 10,
                                                     model.feature_dim)
    without = get_method("fedhpro").make_strategy(cfg, model.state_dict(), 10,
                                                  model.feature_dim)
    full = client_replies("fedhpro", with_recal, model, paper)
    lean = client_replies("fedhpro", without, model, cfg)
    assert sorted(lean[0].content.array_records[STATS_RECORD].keys()) == [
        "classes", "counts", "feature_grads"]
    assert sorted(full[0].content.array_records[STATS_RECORD].keys()) == [
        "bias_grads", "classes", "counts", "weight_grads"]
    for sent, rebuilt in zip(lean, full, strict=True):  # same samples: extraction comes first
        want = without.decode_extra(sent.content).feature_grads
        assert torch.allclose(with_recal.decode_extra(rebuilt.content).feature_grads, want,
                              atol=1e-6)

    assert without.aggregate_train(1, lean)[0] is not None
    assert with_recal.aggregate_train(1, full)[0] is not None
    sizes = [{name: len(array.data) for name, array in
              r.content.array_records[STATS_RECORD].items()} for r in full + lean]
    saved = with_recal.report.bytes_up - without.report.bytes_up
    assert saved == sum(s.get("weight_grads", 0) + s.get("bias_grads", 0)
                        - s.get("feature_grads", 0) for s in sizes)


def test_fedhpro_with_moments_uploads_class_moments_and_recalibrates_on_them():
    cfg = parse_experiment({**CFG.to_dict(), "fedhpro": {"recal_source": "moments"}})
    model = build_model(cfg.model, dataset_spec(cfg))
    strategy = get_method("fedhpro").make_strategy(cfg, model.state_dict(), 10,
                                                   model.feature_dim)
    replies = client_replies("fedhpro", strategy, model, cfg)
    assert sorted(replies[0].content.array_records[STATS_RECORD].keys()) == [
        "classes", "counts", "feature_grads", "feature_means", "feature_vars"]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert strategy.aggregated_head is not None
    recalibrated = arrays.to_torch_state_dict()["classifier.weight"]
    assert not torch.equal(recalibrated, strategy.aggregated_head["weight"])
    assert strategy.federated.seen.all()  # every class is held by some client here
    assert "recal_match_loss_before" not in strategy.report.row()


def test_fedhpro_sends_and_evaluates_the_recalibrated_classifier():
    """The recalibrated classifier replaces the averaged one in what the clients get (as the
    reference code does) and in what the server scores; the averaged one is scored beside it."""
    model = build_model(CFG.model, dataset_spec(CFG))
    strategy = get_method("fedhpro").make_strategy(CFG, model.state_dict(), 10,
                                                   model.feature_dim)
    sent = strategy.aggregate_train(1, client_replies("fedhpro", strategy, model, CFG))[0]
    assert sent is not None and strategy.aggregated_head is not None
    state = sent.to_torch_state_dict()
    for key in ("weight", "bias"):
        assert torch.equal(strategy.head[key], state[f"classifier.{key}"])  # measured at next
        assert not torch.equal(strategy.aggregated_head[key], state[f"classifier.{key}"])
    data = held_out_data(CFG)
    model.load_state_dict(state)
    scores = strategy.evaluate_model(model, data, torch.device("cpu"))
    assert torch.equal(model.state_dict()["classifier.weight"], state["classifier.weight"])
    assert scores["accuracy"] != scores["aggregated_head_accuracy"]
    model.classifier.load_state_dict(strategy.aggregated_head)
    assert scores["aggregated_head_accuracy"] == evaluate(model, data, torch.device("cpu"))[1]

def test_fedhpro_server_step_over_groups_and_nearest_classes():
    """The caps that make the server step linear in the classes: a round with caps below the
    10 classes; one with caps of 10, one with the defaults (32) and one with none, which are
    the same round exactly."""
    cfg = parse_experiment({**CFG.to_dict(), "fedhpro": {"recal_source": "moments"}})
    model = build_model(cfg.model, dataset_spec(cfg))
    replies = client_replies("fedhpro", get_method("fedhpro").make_strategy(
        cfg, model.state_dict(), 10, model.feature_dim), model, cfg)

    def round_with(**caps):
        run_cfg = parse_experiment({**CFG.to_dict(),
                                    "fedhpro": {"recal_source": "moments", **caps}})
        strategy = get_method("fedhpro").make_strategy(run_cfg, model.state_dict(), 10,
                                                       model.feature_dim)
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        return arrays.to_torch_state_dict(), strategy

    def capped(cap):
        return round_with(recal_classes_per_step=cap, hp_softmax_classes=cap)

    full, full_strategy = capped(0)
    for weights, strategy in (capped(10), round_with()):
        assert all(torch.equal(full[k], weights[k]) for k in full)
        assert torch.equal(full_strategy.hyperprototypes, strategy.hyperprototypes)
    grouped, strategy = capped(4)
    assert not torch.equal(grouped["classifier.weight"], full["classifier.weight"])
    assert not torch.equal(strategy.hyperprototypes, full_strategy.hyperprototypes)
    row = strategy.report.row()
    assert 0 < row["hp_neighbour_cosine"] <= 1 and "hp_neighbour_cosine" not in (
        full_strategy.report.row())
    assert row["hp_match_loss_after"] < row["hp_match_loss_before"]


def test_the_server_scores_the_validation_share_beside_the_test_set():
    cfg = parse_experiment({**CFG.to_dict(), "data": {"validation_fraction": 0.1}})
    info = dataset_spec(cfg)
    model = build_model(cfg.model, info)
    method = get_method("creff")  # evaluates with its own re-trained classifier
    strategy = method.make_strategy(cfg, model.state_dict(), info.num_classes,
                                    model.feature_dim)
    scores = sharing_for(cfg, method).evaluate(1, strategy, model, model.state_dict(),
                                               held_out(cfg), torch.device("cpu"))
    on_validation = strategy.evaluate_model(model, validation_data(cfg), torch.device("cpu"))
    on_test = strategy.evaluate_model(model, held_out_data(cfg), torch.device("cpu"))
    assert (scores["val_accuracy"], scores["val_loss"]) == (on_validation["accuracy"],
                                                            on_validation["loss"])
    assert (scores["accuracy"], scores["loss"]) == (on_test["accuracy"], on_test["loss"])
    assert scores["val_loss"] != scores["loss"]  # two different sets were scored


class WholeGrid:
    """A grid of `nodes` that all train every round (no partition query is needed)."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_record_keys_the_strategy_chose_are_read_and_answered_under_on_both_sides():
    """Flower lets a strategy name its records (`arrayrecord_key`, `configrecord_key`,
    `weighted_by_key`); the client reads the weights and config under those names and replies
    under them, so a round with other names runs as with Flower's (FedProx: its mu travels in
    the config record)."""
    model = build_model(CFG.model, dataset_spec(CFG))
    strategies = [get_method("fedprox").make_strategy(CFG, model.state_dict(), 10,
                                                      model.feature_dim) for _ in range(2)]
    renamed = strategies[1]
    renamed.arrayrecord_key, renamed.configrecord_key = "global-weights", "train-config"
    renamed.metricrecord_key, renamed.weighted_by_key = "client-metrics", "examples"
    results = []
    for strategy in strategies:
        config = ConfigRecord({STRATEGY_KEY: "fedprox", EXPERIMENT_ID_KEY: "keys",
                               **dataset_spec(CFG).to_config()})
        messages = list(strategy.configure_train(1, tensors_to_record(model.state_dict()),
                                                 config, WholeGrid([100, 101, 102])))
        replies = []
        for pid, message in enumerate(messages):
            context = Context(run_id=1, node_id=100 + pid, state=RecordDict(), run_config={},
                              node_config={"partition-id": pid, "num-partitions": NUM_CLIENTS})
            replies.append(handle_train(message, context))
        results.append((messages[0].content, replies[0].content,
                        strategy.aggregate_train(1, replies)[0]))
    (_, default_reply, default_arrays), (sent, reply, arrays) = results
    assert set(sent.array_records) == {"global-weights"}
    assert {"train-config", EXPERIMENT_RECORD} <= set(sent.config_records)
    assert set(reply.array_records) == {"global-weights"}
    assert set(reply.metric_records) == {"client-metrics"}
    assert reply["client-metrics"]["examples"] == default_reply["metrics"]["num-examples"]
    assert renamed.report is not None and renamed.report.left_out == []
    assert default_arrays is not None and arrays is not None
    want, got = default_arrays.to_torch_state_dict(), arrays.to_torch_state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
