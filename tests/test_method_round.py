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
from fedhpro_flwr.app.client import handle_train
from fedhpro_flwr.app.sharing import sharing_for
from fedhpro_flwr.config import (
    EXPERIMENT_ID_KEY,
    STRATEGY_KEY,
    ConfigError,
    ExperimentConfig,
)
from fedhpro_flwr.data.federated import dataset_spec, held_out, held_out_data, validation_data
from fedhpro_flwr.methods import METHODS, get_method, parse_experiment
from fedhpro_flwr.methods.fedprox import MU_KEY
from fedhpro_flwr.methods.payload import EXPERIMENT_RECORD, PayloadError, tensors_to_record
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
    model = build_model(CFG.model, info)
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
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
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


def test_the_row_target_travels_as_class_rows_without_the_classifier_gradients():
    """With class moments, the row-grads target costs C x d more per client, not C x C x d:
    the own rows the paper's recalibration would have carried on its diagonal."""
    rows = {"hp_target": "row-grads", "hp_step": "normalized", "lr_hp": 0.01}
    lean = parse_experiment({**CFG.to_dict(), "fedhpro": rows})
    paper = parse_experiment({**CFG.to_dict(), "fedhpro": {**rows, "recal_source": "gradients"}})
    model = build_model(lean.model, dataset_spec(lean))
    strategies = [get_method("fedhpro").make_strategy(cfg, model.state_dict(), 10,
                                                      model.feature_dim) for cfg in (lean, paper)]
    lean_replies, paper_replies = (client_replies("fedhpro", strategy, model, cfg)
                                   for strategy, cfg in zip(strategies, (lean, paper), strict=True))
    assert sorted(lean_replies[0].content.array_records[STATS_RECORD].keys()) == [
        "classes", "counts", "feature_grads", "feature_means", "feature_vars", "own_row_grads"]
    for sent, diagonal in zip(lean_replies, paper_replies, strict=True):  # the same samples
        own = strategies[0].decode_extra(sent.content).own_row_grads
        assert own.abs().sum() > 0
        assert torch.allclose(own, strategies[1].decode_extra(diagonal.content).own_row_grads,
                              atol=1e-6)

    start = strategies[0].hyperprototypes.clone()
    assert strategies[0].aggregate_train(1, lean_replies)[0] is not None
    row = strategies[0].report.row()
    assert row["hp_match_loss_after"] < row["hp_match_loss_before"]
    assert not torch.equal(strategies[0].hyperprototypes, start)
    default = parse_experiment({**CFG.to_dict(), "fedhpro": {}})
    without_rows = client_replies("fedhpro", strategies[0], model, default)[0]
    with pytest.raises(PayloadError, match=r"missing arrays \['own_row_grads'\]"):
        strategies[0].decode_extra(without_rows.content)


def test_fedhpro_can_evaluate_with_the_recalibrated_classifier_and_send_the_averaged_one():
    """`recal_to_clients: false` (CReFF's way): the same recalibration scores the round, but the
    clients get, and next measure at, the averaged classifier."""
    model = build_model(CFG.model, dataset_spec(CFG))
    fedhpro = get_method("fedhpro")
    sending, keeping = (fedhpro.make_strategy(
        parse_experiment({**CFG.to_dict(), "fedhpro": {"recal_to_clients": flag}}),
        model.state_dict(), 10, model.feature_dim) for flag in (True, False))
    replies = client_replies("fedhpro", sending, model, CFG)
    sent, kept = (strategy.aggregate_train(1, replies)[0] for strategy in (sending, keeping))
    assert sent is not None and kept is not None
    sent_state, kept_state = sent.to_torch_state_dict(), kept.to_torch_state_dict()
    assert keeping.aggregated_head is not None and sending.recalibrated_head is not None
    for key in ("weight", "bias"):
        averaged = keeping.aggregated_head[key]
        assert torch.equal(kept_state[f"classifier.{key}"], averaged)
        assert torch.equal(keeping.head[key], averaged)  # next round's clients measure here
        assert torch.equal(sent_state[f"classifier.{key}"], sending.recalibrated_head[key])
        assert not torch.equal(averaged, sending.recalibrated_head[key])
    assert torch.equal(keeping.recalibrated_head["weight"], sending.recalibrated_head["weight"])
    assert all(torch.equal(sent_state[k], kept_state[k]) for k in sent_state
               if not k.startswith("classifier."))

    data = held_out_data(CFG)
    scores = []
    for strategy, state in ((sending, sent_state), (keeping, kept_state)):
        model.load_state_dict(state)
        scores.append(strategy.evaluate_model(model, data, torch.device("cpu")))
        assert torch.equal(model.state_dict()["classifier.weight"],
                           state["classifier.weight"])  # evaluation left the model alone
    assert scores[0] == scores[1]
    assert scores[0]["accuracy"] != scores[0]["aggregated_head_accuracy"]


def test_recalibrating_for_evaluation_only_trains_as_without_recalibration():
    """With `recal_to_clients: false` the recalibration reaches nothing the clients train
    with: the round's model and hyper-prototypes are those of `recalibration: false`."""
    model = build_model(CFG.model, dataset_spec(CFG))
    rounds = []
    for keys in ({"recal_to_clients": False}, {"recalibration": False}):
        cfg = parse_experiment({**CFG.to_dict(), "fedhpro": {"recal_epochs": 20, **keys}})
        strategy = get_method("fedhpro").make_strategy(cfg, model.state_dict(), 10,
                                                       model.feature_dim)
        arrays = strategy.aggregate_train(1, client_replies("fedhpro", strategy, model, cfg))[0]
        assert arrays is not None
        rounds.append((arrays.to_torch_state_dict(), strategy.hyperprototypes))
    (evaluated, hp_evaluated), (without, hp_without) = rounds
    assert all(torch.equal(evaluated[k], without[k]) for k in without)
    assert torch.equal(hp_evaluated, hp_without)


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


def test_separated_anchors_need_no_more_classes_than_dimensions():
    cfg = parse_experiment({**CFG.to_dict(), "fedhpro": {"hp_separate": True}})
    model = build_model(cfg.model, dataset_spec(cfg))
    with pytest.raises(ConfigError, match=r"'fedhpro\.hp_separate' = true needs classes <= "
                                          r"feature dim: 10 classes, 8 dims"):
        get_method("fedhpro").make_strategy(cfg, model.state_dict(), 10, 8)


def test_hyperprototypes_matched_to_the_whole_classifier_gradients():
    paper_recal = {"recal_source": "gradients", "recal_solver": "sgd", "recal_epochs": 20}
    cfg = parse_experiment({**CFG.to_dict(), "fedhpro": {**paper_recal,
                                                         "hp_target": "classifier-grads"}})
    model = build_model(cfg.model, dataset_spec(cfg))
    strategy = get_method("fedhpro").make_strategy(cfg, model.state_dict(), 10,
                                                   model.feature_dim)
    start = strategy.hyperprototypes.clone()
    arrays, _ = strategy.aggregate_train(1, client_replies("fedhpro", strategy, model, cfg))
    assert arrays is not None
    row = strategy.report.row()
    assert row["hp_match_loss_after"] < row["hp_match_loss_before"]
    assert not torch.equal(strategy.hyperprototypes, start)


def test_a_closed_form_head_keeps_the_clients_scale():
    # the Bayes scale of a nearest-class-mean head (one over the feature variance) made the
    # clients' losses overflow in round 2 of mnist-lt; at the round's own scale they train on
    cfg = parse_experiment({**CFG.to_dict(), "fedhpro": {"recal_source": "moments",
                                                         "recal_solver": "gaussian"}})
    model = build_model(cfg.model, dataset_spec(cfg))
    strategy = get_method("fedhpro").make_strategy(cfg, model.state_dict(), 10,
                                                   model.feature_dim)
    start = model.classifier.weight.detach().clone()
    arrays, _ = strategy.aggregate_train(1, client_replies("fedhpro", strategy, model, cfg))
    assert arrays is not None
    head = arrays.to_torch_state_dict()["classifier.weight"]
    assert head.norm().item() == pytest.approx(start.norm().item(), rel=1e-5)
    model.load_state_dict(arrays.to_torch_state_dict())
    replies = [handle_train(training_message("fedhpro", strategy, arrays, 100 + pid, cfg, 2),
                            Context(run_id=1, node_id=100 + pid, state=RecordDict(),
                                    run_config={}, node_config={"partition-id": pid,
                                                                "num-partitions": NUM_CLIENTS}))
               for pid in range(NUM_CLIENTS)]
    assert strategy.aggregate_train(2, replies)[0] is not None
    assert strategy.report.left_out == []
    assert all(r.content.metric_records["metrics"]["train_loss"] < 10 for r in replies)


def first_round_accuracies(**fedhpro) -> tuple[float, float]:
    """Round 1 of FedHPro with recalibration: accuracy of the FedAvg'd classifier and of the
    recalibrated one that replaces it."""
    cfg = parse_experiment({"partition": {"num_partitions": NUM_CLIENTS},
                                      "train": {"local_epochs": 1}, "fedhpro": fedhpro})
    info = dataset_spec(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info)
    strategy = get_method("fedhpro").make_strategy(cfg, model.state_dict(), info.num_classes,
                                                   model.feature_dim)
    new_arrays, _ = strategy.aggregate_train(1, client_replies("fedhpro", strategy, model, cfg))
    assert new_arrays is not None
    model.load_state_dict(new_arrays.to_torch_state_dict())
    scores = strategy.evaluate_model(model, held_out_data(cfg), torch.device("cpu"))
    return scores["aggregated_head_accuracy"], scores["accuracy"]


def test_recalibration_fix_keeps_the_first_round_from_collapsing():
    # The paper's recalibration trains the classifier on features matched to gradients taken
    # before local training, around zero: the trained extractor's features are neither
    # (issue 8, Q2). Measuring after training and re-centring on the class means fixes it.
    paper_recal = {"recal_source": "gradients", "recal_solver": "sgd"}
    averaged, paper = first_round_accuracies(**paper_recal)
    same, fixed = first_round_accuracies(**paper_recal, recal_after_training=True,
                                         recal_recentre=True)
    print(f"averaged classifier {averaged:.3f}, recalibrated {paper:.3f}, fixed {fixed:.3f}")
    assert same == averaged  # the fix changes no client's training
    assert paper < averaged - 0.05  # measured: 0.052 against 0.170
    assert fixed > averaged and fixed > paper + 0.1  # measured: 0.201


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
