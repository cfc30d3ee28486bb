"""Clients with different backbones: what they keep, what they share, how they are evaluated.

The in-process tests drive the real ClientApp handler with messages built as the strategies
build them (see test_method_round); the last test runs Flower's simulation engine.
"""

import json
import statistics

import pytest
import torch
from flwr.app import Context, RecordDict
from simulate import CONFIG, NUM_CLIENTS, assert_same_run, checkpoint, simulate
from test_method_round import training_message

from fedhpro_flwr.app.client import handle_train
from fedhpro_flwr.app.personal_store import PersonalModelStore
from fedhpro_flwr.app.sharing import LOCAL_MODEL, NodeMemory, PersonalModels, sharing_for
from fedhpro_flwr.config import ConfigError
from fedhpro_flwr.data.federated import client_data, dataset_spec
from fedhpro_flwr.methods import METHODS, get_method, parse_experiment
from fedhpro_flwr.methods.payload import tensors_to_record
from fedhpro_flwr.methods.prototype import LOCAL_RECORD
from fedhpro_flwr.methods.recalibrating import STATS_RECORD
from fedhpro_lab.simulation import simulate as run_experiment

pytestmark = pytest.mark.usefixtures("serverapp_identity")

BACKBONES = "cnn-8,cnn-16,resnet10-4"
# the methods that work with personal models (they average no whole model)
PERSONAL = [name for name, m in METHODS.items() if m.personal_weights is not None]
CFG = parse_experiment({
    "partition": {"num_partitions": NUM_CLIENTS},
    "model": {"backbones": BACKBONES},
    "train": {"local_epochs": 1},
    "fedhpro": {"recal_epochs": 20},
})


def personal(name="fedhpro", cfg=CFG) -> PersonalModels:
    mode = sharing_for(cfg, get_method(name))
    assert isinstance(mode, PersonalModels)
    return mode


def server_side(name, cfg=CFG):
    info = dataset_spec(cfg)
    mode = personal(name, cfg)
    model = mode.server_model(info)
    shared = mode.shared(model.state_dict())
    return shared, get_method(name).make_strategy(cfg, shared, info.num_classes,
                                                  model.feature_dim)


def train(name, strategy, shared, pid, context, cfg=CFG, server_round=1,
          experiment="test-experiment"):
    message = training_message(name, strategy, tensors_to_record(shared), 100 + pid, cfg,
                               server_round, experiment)
    return handle_train(message, context)


def contexts():
    return [Context(run_id=1, node_id=100 + pid, state=RecordDict(), run_config={},
                    node_config={"partition-id": pid, "num-partitions": NUM_CLIENTS})
            for pid in range(NUM_CLIENTS)]


def test_backbones_are_dealt_in_turn_or_named_by_the_node():
    mode = personal()
    assert [mode.backbone(k, {}) for k in range(4)] == [
        ("cnn", 8), ("cnn", 16), ("resnet10", 4), ("cnn", 8)]
    assert mode.backbone(0, {"backbone": "resnet10-16"}) == ("resnet10", 16)
    with pytest.raises(ConfigError, match="node config 'backbone'"):
        mode.backbone(0, {"backbone": "vgg-3"})
    with pytest.raises(ConfigError, match=r"'model\.backbones'.*'cnn' is not cnn-W"):
        parse_experiment({"model": {"backbones": "cnn,resnet10-8"}})


@pytest.mark.parametrize("name", [n for n in METHODS if n not in PERSONAL])
def test_weight_averaging_methods_are_refused(name):
    with pytest.raises(ConfigError, match=f"strategy '{name}' averages the clients' model "
                                          "weights.*use one of fedhpro, fedproto, fedsa, fedtgp"):
        sharing_for(CFG, get_method(name))


@pytest.mark.parametrize("name", PERSONAL)
def test_shared_payloads_have_the_same_shapes_across_architectures(name):
    shared, strategy = server_side(name)
    replies = [train(name, strategy, shared, pid, ctx) for pid, ctx in enumerate(contexts())]
    record = STATS_RECORD if name == "fedhpro" else LOCAL_RECORD
    for reply in replies:
        assert not reply.has_error()
        arrays = reply.content.array_records["arrays"]
        # FedHPro shares only the linear head; FedProto and FedTGP no weights at all
        assert sorted(arrays.keys()) == sorted(shared)
        assert {k: a.shape for k, a in arrays.items()} == {k: tuple(t.shape)
                                                            for k, t in shared.items()}
        metrics = reply.content.metric_records["metrics"]
        # a share of the client's own test split: a whole number of its samples
        correct = metrics["local_accuracy"] * metrics["local_test_size"]
        assert correct == pytest.approx(round(correct), abs=1e-6) and metrics["local_test_size"]
    # per class, every client sends rows of the same shape whatever its backbone (the number
    # of rows is the number of classes it holds)
    trailing: dict[str, set] = {}
    for reply in replies:
        for key, array in reply.content.array_records[record].items():
            trailing.setdefault(key, set()).add(tuple(array.shape[1:]))
    assert all(len(shapes) == 1 for shapes in trailing.values()), trailing
    if name == "fedhpro":  # feature gradients and the features' class moments
        d = CFG.model.feature_dim
        assert trailing == {"classes": {()}, "counts": {()}, "feature_grads": {(d,)},
                            "feature_means": {(d,)}, "feature_vars": {()}}
    else:
        assert trailing["prototypes"] == {(CFG.model.feature_dim,)}
    assert strategy.aggregate_train(1, replies)[0] is not None
    found = strategy.report.personal
    assert found.mean == pytest.approx(sum(found.by_partition.values()) / NUM_CLIENTS)


def test_a_clients_validation_share_is_cut_from_its_training_part():
    cfg = parse_experiment({**CFG.to_dict(), "data": {"validation_fraction": 0.2}})
    data = client_data(CFG, 1)
    train, test, validation = personal("fedhpro", cfg).local_split(data, 1)
    _, same_test, none = personal("fedhpro").local_split(data, 1)
    assert none is None and torch.equal(test.y, same_test.y)  # the test part is unchanged
    assert len(train) + len(test) + len(validation) == len(data)
    assert len(validation) == pytest.approx(0.2 * (len(data) - len(test)), abs=10)


def test_a_clients_model_persists_between_rounds():
    shared, strategy = server_side("fedhpro")
    context = contexts()[2]  # the ResNet-10 client
    train("fedhpro", strategy, shared, 2, context)
    after_one = context.state.array_records[LOCAL_MODEL].to_torch_state_dict()
    fresh, restored = personal().local_model(dataset_spec(CFG), ("resnet10", 4),
                                             NodeMemory(RecordDict(), "another", 2), 2)
    assert not restored
    # round 2 with a vanishing step: its model ends where round 1 left it, not anywhere fresh
    still = parse_experiment({**CFG.to_dict(), "train": {"local_epochs": 1,
                                                                 "lr": 1e-12}})
    train("fedhpro", strategy, shared, 2, context, still, server_round=2)
    after_two = context.state.array_records[LOCAL_MODEL].to_torch_state_dict()
    for key, value in after_one.items():
        if key.startswith("extractor") and value.is_floating_point() and "running" not in key:
            assert torch.allclose(after_two[key], value, atol=1e-6), key
    changed = [k for k, v in fresh.state_dict().items()
               if k.startswith("extractor") and not torch.equal(v, after_one[k])]
    assert changed  # round 1 trained the extractor away from its initialisation


def test_a_node_starts_afresh_for_another_experiment():
    shared, strategy = server_side("fedproto")
    context = contexts()[1]
    first = train("fedproto", strategy, shared, 1, context, experiment="a")
    again = train("fedproto", strategy, shared, 1, context, server_round=2, experiment="a")
    other = train("fedproto", strategy, shared, 1, context, server_round=2, experiment="b")
    restored = [m.content.metric_records["metrics"]["local_model_restored"]
                for m in (first, again, other)]
    assert restored == [0.0, 1.0, 0.0]


def test_a_node_whose_state_is_gone_continues_from_its_disk():
    """A resumed run is a new Flower run with empty node states: the model comes from the
    node's disk, filed under the experiment and the round before."""
    shared, strategy = server_side("fedproto")
    first = contexts()[1]
    train("fedproto", strategy, shared, 1, first, experiment="disk")
    kept = first.state.array_records[LOCAL_MODEL].to_torch_state_dict()
    on_disk = PersonalModelStore(CFG, "disk", 1).latest(1)
    assert on_disk is not None and all(torch.equal(on_disk[k], v) for k, v in kept.items())
    mode = personal("fedproto")
    model, restored = mode.local_model(dataset_spec(CFG), ("cnn", 16),
                                       NodeMemory(RecordDict(), "disk", 2), 1)
    assert restored and all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())
    # a client not sampled in round 2 continues in round 3 from the model of round 1
    assert mode.local_model(dataset_spec(CFG), ("cnn", 16), NodeMemory(RecordDict(), "disk", 3),
                            1)[1]
    for memory in (NodeMemory(RecordDict(), "disk", 1),  # nothing saved before round 1
                   NodeMemory(RecordDict(), "other", 2)):  # nor for another experiment
        assert not mode.local_model(dataset_spec(CFG), ("cnn", 16), memory, 1)[1]


def test_the_store_keeps_two_rounds_and_refuses_odd_names(tmp_path):
    cfg = parse_experiment({**CFG.to_dict(), "data": {"root": str(tmp_path)}})
    store = PersonalModelStore(cfg, "e1", 0)
    for round_ in (1, 2, 4):  # not sampled in round 3
        store.save(round_, {"w": torch.full((2,), float(round_))})
    assert store.rounds() == [2, 4]
    assert torch.equal(store.latest(4)["w"], torch.full((2,), 4.0))
    assert torch.equal(store.latest(3)["w"], torch.full((2,), 2.0))
    assert store.latest(1) is None
    assert PersonalModelStore(cfg, "e1", 1).latest(4) is None  # another client's
    with pytest.raises(ValueError, match="not a plain name"):
        PersonalModelStore(cfg, "../elsewhere", 0)


@pytest.mark.slow
@pytest.mark.parametrize("sampled", ["every client", "two of three"])
def test_a_resumed_heterogeneous_run_replays_the_uninterrupted_one(tmp_path, sampled):
    overrides = (f"partition.num_partitions={NUM_CLIENTS} train.local_epochs=1 "
                 f"model.backbones={BACKBONES} " + (
                     f"federation.min_train_nodes={NUM_CLIENTS}" if sampled == "every client"
                     # seed 1 draws partitions [1, 2], [0, 1], [0, 2], [1, 2]: after the
                     # resume, partition 2 continues from the model it saved in round 1
                     else "federation.fraction_train=0.67 seed=1"))
    straight = simulate(tmp_path / "straight", rounds=4, strategy="fedproto",
                        overrides=overrides)
    simulate(tmp_path / "resumed", rounds=2, strategy="fedproto", overrides=overrides)
    simulate(tmp_path / "resumed", rounds=4, strategy="fedproto", resume=True,
             overrides=overrides)
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")
    seen = set()
    for row in straight["rounds"]:  # every client that trained before continued its model
        assert row["client_models_restored"] == len(seen & set(row["participants"]))
        seen |= set(row["participants"])


@pytest.mark.slow
def test_a_resume_whose_clients_lost_their_models_stops(tmp_path, caplog):
    overrides = (f"partition.num_partitions={NUM_CLIENTS} train.local_epochs=1 "
                 f"federation.min_train_nodes={NUM_CLIENTS} model.backbones={BACKBONES}")
    first = simulate(tmp_path, rounds=1, strategy="fedproto", overrides=overrides)
    cfg = parse_experiment(first["config"])
    for pid in range(NUM_CLIENTS):
        PersonalModelStore(cfg, first["experiment_id"], pid).path(1).unlink()
    after = simulate(tmp_path, rounds=2, strategy="fedproto", resume=True, overrides=overrides)
    assert len(after["rounds"]) == 1 and checkpoint(tmp_path)["round"] == 1  # left as it was
    assert (f"{NUM_CLIENTS} of {NUM_CLIENTS} clients that had trained found no personal model"
            in caplog.text)


@pytest.mark.slow
def test_experiments_sharing_a_federation_do_not_share_personal_models(tmp_path):
    # the benchmark runs a setting's strategies one after another on one simulated federation
    overrides = (f"partition.num_partitions={NUM_CLIENTS} train.local_epochs=1 "
                 f"federation.min_train_nodes={NUM_CLIENTS} model.backbones={BACKBONES}")
    run_experiment([{"strategy": "fedproto", "config": CONFIG, "num-server-rounds": 1,
                     "out-dir": str(tmp_path / name), "resume": False,
                     "overrides": overrides} for name in ("first", "second")], NUM_CLIENTS)
    for name in ("first", "second"):
        (row,) = json.loads((tmp_path / name / "results.json").read_text())["rounds"]
        assert row["client_models_restored"] == 0, name


@pytest.mark.slow
@pytest.mark.parametrize("name", PERSONAL)
def test_heterogeneous_clients_complete_a_simulation(tmp_path, name):
    # every round waits for all nodes: a loaded machine may start the engine's nodes late
    overrides = (f"partition.num_partitions={NUM_CLIENTS} train.local_epochs=1 "
                 f"federation.min_train_nodes={NUM_CLIENTS} "
                 f"model.backbones={BACKBONES} fedhpro.recal_epochs=20")
    results = simulate(tmp_path, rounds=2, strategy=name, overrides=overrides)
    assert results["initial"] == {}  # nothing is evaluated before the clients train
    for row in results["rounds"]:
        clients = row["client_accuracies"]
        assert sorted(clients) == [str(k) for k in range(NUM_CLIENTS)]
        assert row["accuracy"] == pytest.approx(sum(clients.values()) / NUM_CLIENTS)
        assert row["client_accuracy_min"] == min(clients.values())
        assert row["client_accuracy_std"] == pytest.approx(statistics.pstdev(clients.values()))
    first, second = results["rounds"]
    assert first["client_models_restored"] == 0  # fresh models in round 1...
    assert second["client_models_restored"] == NUM_CLIENTS  # ...kept by every node for round 2
    assert results["final_accuracy"] > 0.2  # above the 0.1 of chance
