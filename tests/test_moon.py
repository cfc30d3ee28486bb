"""MOON: its loss written out by hand, its model, a client update built by hand from the paper's
formula, rounds through the real client handler and strategy (the previous model kept between
rounds, from the context state and from the node's disk, bit for bit), a resumed simulation,
and a deployed federation whose SuperNode restarts between rounds 2 and 3."""

import copy
import hashlib
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from flwr.app import Context, RecordDict
from hand_steps import Kept, max_difference, state_of
from simulate import NUM_CLIENTS, assert_same_run, simulate
from test_method_round import training_message

from fedhpro_flwr.algorithms.contrastive import ProjectedBackbone, model_contrastive_loss
from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.algorithms.training import train_epochs
from fedhpro_flwr.app.client import handle_train
from fedhpro_flwr.app.kept import NodeKeptModel
from fedhpro_flwr.app.personal_store import PersonalModelStore
from fedhpro_flwr.app.sharing import NodeMemory, sharing_for
from fedhpro_flwr.config import ConfigError
from fedhpro_flwr.data.federated import client_data, dataset_spec
from fedhpro_flwr.methods import ClientTask, get_method, moon, parse_experiment
from fedhpro_flwr.methods.moon import PREVIOUS_ROUND, MoonConfig
from fedhpro_flwr.methods.payload import tensors_to_record

pytestmark = pytest.mark.usefixtures("serverapp_identity")

MOON = get_method("moon")
SAMPLES = 48  # one batch: one SGD step per local epoch, so the update is one gradient


def moon_cfg(root, **sections):
    return parse_experiment({"partition": {"num_partitions": NUM_CLIENTS},
                             "data": {"root": str(root)}, "train": {"local_epochs": 1},
                             "moon": {"out_dim": 32}, **sections})


def moon_model(cfg, seed=None) -> ProjectedBackbone:
    torch.manual_seed(cfg.seed if seed is None else seed)
    model = sharing_for(cfg, MOON).server_model(dataset_spec(cfg))
    assert isinstance(model, ProjectedBackbone)
    return model



def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



# ---- the loss and the model --------------------------------------------------------------

def test_the_model_contrastive_loss_written_out_by_hand():
    z = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
    z_glob = torch.tensor([[1.0, 1.0, 2.0], [-0.5, -1.0, 1.0]])
    z_prev = torch.tensor([[0.0, 3.0, 0.0], [0.5, -1.0, 0.5]])
    t = 0.5

    def cos(a, b):
        return sum(p * q for p, q in zip(a, b, strict=True)) / (
            math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))

    per_sample = []
    for a, g, p in zip(z.tolist(), z_glob.tolist(), z_prev.tolist(), strict=True):
        positive, negative = math.exp(cos(a, g) / t), math.exp(cos(a, p) / t)
        per_sample.append(-math.log(positive / (positive + negative)))
    want = sum(per_sample) / len(per_sample)
    assert model_contrastive_loss(z, z_glob, z_prev, t).item() == pytest.approx(want, rel=1e-6)
    # the temperature scales the similarities: at t = 2 the same inputs give another loss
    assert model_contrastive_loss(z, z_glob, z_prev, 2.0).item() != pytest.approx(want)
    # a positive and a negative that are the same give log 2 whatever z
    assert model_contrastive_loss(z, z_glob, z_glob, t).item() == pytest.approx(math.log(2))
    # closer to the global model than to the previous one: below log 2, the other way above
    assert model_contrastive_loss(z, z, z_prev, t).item() < math.log(2)
    assert model_contrastive_loss(z, z_prev, z, t).item() > math.log(2)


def test_the_projection_head_sits_between_the_extractor_and_the_classifier(tmp_path):
    cfg = moon_cfg(tmp_path)
    model = moon_model(cfg)
    plain = build_model(cfg.model, dataset_spec(cfg))
    d = plain.feature_dim
    assert [type(m) for m in model.head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (model.head[0].in_features, model.head[0].out_features) == (d, d)
    assert (model.head[2].in_features, model.head[2].out_features) == (d, 32)
    assert model.feature_dim == 32 and model.classifier.in_features == 32
    assert not any(k.startswith("backbone.classifier") for k in model.state_dict())
    x = client_data(cfg, 0).x[:5]
    assert torch.equal(model.features(x), model.head(model.backbone.features(x)))
    assert torch.equal(model(x), model.classifier(model.features(x)))
    # the extractor is drawn as every other method draws it (the seed pairs the runs), and
    # the other methods' models are the backbone as it is
    torch.manual_seed(cfg.seed)
    fedavg = sharing_for(cfg, get_method("fedavg")).server_model(dataset_spec(cfg))
    torch.manual_seed(cfg.seed)
    assert same(fedavg.state_dict(), build_model(cfg.model, dataset_spec(cfg)).state_dict())
    assert same({f"backbone.{k}": v for k, v in fedavg.state_dict().items()
                 if not k.startswith("classifier")},
                {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    # with model.init=kaiming the head is He-initialised as the extractor is
    head = moon_model(moon_cfg(tmp_path, model={"init": "kaiming"})).head[0]
    assert head.weight.std().item() == pytest.approx(math.sqrt(2 / d), rel=0.05)
    assert not head.bias.any() and model.head[0].bias.any()


def test_its_config_section_has_its_codes_defaults_and_clear_errors():
    assert MoonConfig() == MoonConfig(mu=1.0, temperature=0.5, out_dim=256)
    for key, value, message in (("temperature", 0.0, "must be > 0"),
                                ("mu", -1.0, "must be >= 0"),
                                ("out_dim", 0, "must be >= 1")):
        with pytest.raises(ConfigError, match=f"'moon.{key}' = {value}: {message}"):
            parse_experiment({"moon": {key: value}})
    with pytest.raises(ConfigError, match="strategy 'moon' averages the clients' model"):
        sharing_for(parse_experiment({"model": {"backbones": "cnn-8,cnn-16"}}), MOON)


# ---- the client update against one built by hand -----------------------------------------

def one_step(tmp_path, epochs=1, **moon_keys):
    """One full-batch SGD step per local epoch."""
    return moon_cfg(tmp_path, train={"local_epochs": epochs, "batch_size": SAMPLES, "lr": 0.1},
                    moon={"out_dim": 32, **moon_keys})


def client_update(cfg, kept):
    model = moon_model(cfg)
    data = client_data(cfg, 0).subset(torch.arange(SAMPLES).numpy())
    task = ClientTask(model, data, RecordDict(), cfg, torch.device("cpu"),
                      torch.Generator().manual_seed(11), kept)
    _, metrics = MOON.client_train(task)
    return state_of(model), metrics


def hand_built_steps(cfg, previous_state):
    """One full-batch SGD step per local epoch on CE + mu * l_con, l_con written from the
    paper's equation: (the weights after them, the mean l_con)."""
    moon_keys, lr = cfg.section(MoonConfig), cfg.train.lr
    model = moon_model(cfg)
    global_model, previous = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    previous.load_state_dict(previous_state)
    data = client_data(cfg, 0).subset(torch.arange(SAMPLES).numpy())
    with torch.no_grad():
        z_glob, z_prev = global_model.features(data.x), previous.features(data.x)
    t, terms = moon_keys.temperature, []
    for _ in range(cfg.train.local_epochs):
        z = model.features(data.x)
        ce = F.cross_entropy(model.classifier(z), data.y)
        sim_glob = (z * z_glob).sum(1) / (z.norm(dim=1) * z_glob.norm(dim=1))
        sim_prev = (z * z_prev).sum(1) / (z.norm(dim=1) * z_prev.norm(dim=1))
        l_con = -torch.log(torch.exp(sim_glob / t) / (torch.exp(sim_glob / t)
                                                       + torch.exp(sim_prev / t))).mean()
        params = list(model.parameters())
        grads = torch.autograd.grad(ce + moon_keys.mu * l_con, params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param -= lr * grad
        terms.append(l_con.item())
    return state_of(model), sum(terms) / len(terms)


def test_a_client_update_is_the_hand_built_moon_steps_and_is_kept(tmp_path):
    # two steps: in the first the model is the global one, so only from the second on does
    # the global model's projection differ from the client's own
    cfg = one_step(tmp_path, epochs=2, mu=5.0, temperature=0.5)
    previous_state = state_of(moon_model(cfg, seed=1))  # another model: a real negative
    want, l_con = hand_built_steps(cfg, previous_state)
    kept = Kept((3, previous_state))
    got, metrics = client_update(cfg, kept)
    assert max_difference(got, want) < 1e-6
    assert metrics["model_contrastive"] == pytest.approx(l_con, rel=1e-5)
    assert metrics[PREVIOUS_ROUND] == 3.0
    assert same(kept.saved, got)  # the trained model is the next round's previous one
    # the term moves the update well beyond the tolerance above, and each of its parts does
    ce_only, _ = client_update(one_step(tmp_path, epochs=2, mu=0.0), Kept((3, previous_state)))
    assert max_difference(got, ce_only) > 1e-4
    for other in (one_step(tmp_path, epochs=2, mu=1.0, temperature=0.5),
                  one_step(tmp_path, epochs=2, mu=5.0, temperature=2.0)):
        assert max_difference(client_update(other, Kept((3, previous_state)))[0], got) > 1e-5
    swapped, _ = hand_built_steps(cfg, moon_model(cfg).state_dict())  # previous = global
    assert max_difference(swapped, got) > 1e-5


def test_in_a_clients_first_round_the_global_model_stands_in_without_gradient(tmp_path):
    """No previous model: l_con is log 2 with zero gradient, the CE step MOON's code makes
    while its pool of previous models is still empty."""
    cfg = one_step(tmp_path, mu=5.0)
    kept = Kept(None)
    got, metrics = client_update(cfg, kept)
    model = moon_model(cfg)
    data = client_data(cfg, 0).subset(torch.arange(SAMPLES).numpy())
    train_epochs(model, data, cfg.train, torch.Generator().manual_seed(11), torch.device("cpu"))
    assert max_difference(got, state_of(model)) < 1e-6
    assert metrics["model_contrastive"] == pytest.approx(math.log(2))
    assert metrics[PREVIOUS_ROUND] == 0.0 and kept.saved is not None


# ---- rounds through the real client handler and strategy ---------------------------------

def contexts():
    return [Context(run_id=1, node_id=100 + pid, state=RecordDict(), run_config={},
                    node_config={"partition-id": pid, "num-partitions": NUM_CLIENTS})
            for pid in range(NUM_CLIENTS)]


def train_round(strategy, weights, cfg, nodes, server_round, experiment="moon-rounds"):
    """Every client's reply to round `server_round`'s message with the global `weights`."""
    replies = []
    for pid, context in enumerate(nodes):
        message = training_message("moon", strategy, tensors_to_record(weights), 100 + pid, cfg,
                                   server_round, experiment)
        reply = handle_train(message, context)
        assert not reply.has_error(), reply.error
        replies.append(reply)
    return replies


def weights_of(reply) -> dict[str, torch.Tensor]:
    return reply.content.array_records["arrays"].to_torch_state_dict()


def metric(reply, key):
    return reply.content.metric_records["metrics"][key]


@pytest.fixture
def frozen_copies(monkeypatch):
    """The weights of every frozen model MOON's clients build, in order (global, previous)."""
    made = []

    def recording(model, state=None):
        frozen = copy_of(model, state)
        made.append(state_of(frozen))
        return frozen

    copy_of = moon.frozen_copy
    monkeypatch.setattr(moon, "frozen_copy", recording)
    return made


def test_round_two_trains_against_round_ones_local_model_then_resumes_from_disk(
        tmp_path, frozen_copies):
    cfg = moon_cfg(tmp_path)
    start = moon_model(cfg).state_dict()
    strategy = MOON.make_strategy(cfg, start, 10, 32)
    nodes = contexts()
    first = train_round(strategy, start, cfg, nodes, 1)
    assert [metric(r, PREVIOUS_ROUND) for r in first] == [0.0] * NUM_CLIENTS
    assert all(metric(r, "model_contrastive") == pytest.approx(math.log(2)) for r in first)
    arrays, _ = strategy.aggregate_train(1, first)
    assert strategy.report.row()["previous_models"] == 0.0
    second_global = arrays.to_torch_state_dict()
    saved = strategy.state_dict()

    frozen_copies.clear()
    second = train_round(strategy, second_global, cfg, nodes, 2)
    assert [metric(r, PREVIOUS_ROUND) for r in second] == [1.0] * NUM_CLIENTS
    # per client: the frozen global model is round 2's global, the frozen previous one is the
    # model that client trained in round 1 (what it sent), not the global
    assert len(frozen_copies) == 2 * NUM_CLIENTS
    for pid, reply in enumerate(first):
        global_copy, previous_copy = frozen_copies[2 * pid : 2 * pid + 2]
        assert same(global_copy, second_global)
        assert same(previous_copy, weights_of(reply)) and not same(previous_copy, second_global)
    assert all(metric(r, "model_contrastive") < math.log(2) for r in second)
    strategy.aggregate_train(2, second)
    assert strategy.report.row()["previous_models"] == float(NUM_CLIENTS)

    # a resumed run: new node states, so each client reads its round-1 model from its disk
    # (not the round-2 one it saved since: round 2 is replayed) and replays round 2 bit for bit
    for pid, reply in enumerate(first):
        found = NodeKeptModel(cfg, NodeMemory(RecordDict(), "moon-rounds", 2), pid).load()
        assert found is not None and found[0] == 1 and same(found[1], weights_of(reply))
    replayed = train_round(strategy, second_global, cfg, contexts(), 2)
    for straight, again in zip(second, replayed, strict=True):
        assert same(weights_of(straight), weights_of(again))
    resumed = MOON.make_strategy(cfg, start, 10, 32)
    resumed.load_state_dict(saved)
    resumed.round_offset = 1
    arrays, _ = resumed.aggregate_train(1, replayed)  # Flower's round 1 is the run's round 2
    assert arrays is not None and resumed.report.row()["previous_models"] == float(NUM_CLIENTS)


def test_a_resume_whose_clients_lost_their_previous_models_stops(tmp_path):
    cfg = moon_cfg(tmp_path)
    start = moon_model(cfg).state_dict()
    strategy = MOON.make_strategy(cfg, start, 10, 32)
    strategy.aggregate_train(1, train_round(strategy, start, cfg, contexts(), 1, "lost"))
    for pid in range(NUM_CLIENTS):
        PersonalModelStore(cfg, "lost", pid).path(1).unlink()
    resumed = MOON.make_strategy(cfg, start, 10, 32)
    resumed.load_state_dict(strategy.state_dict())
    resumed.round_offset = 1
    replies = train_round(resumed, start, cfg, contexts(), 2, "lost")
    assert [metric(r, PREVIOUS_ROUND) for r in replies] == [0.0] * NUM_CLIENTS
    with pytest.raises(ConfigError, match=r"partitions \[0, 1, 2\] had trained but found "
                                              "no model of an earlier round"):
        resumed.aggregate_train(1, replies)


# ---- Flower's simulation engine and a deployed federation ---------------------------------

@pytest.mark.slow
def test_a_resumed_moon_simulation_replays_the_uninterrupted_one(tmp_path):
    straight = simulate(tmp_path / "straight", rounds=2, strategy="moon")
    simulate(tmp_path / "resumed", rounds=1, strategy="moon")
    resumed = simulate(tmp_path / "resumed", rounds=2, strategy="moon", resume=True)
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")
    assert [r["previous_models"] for r in straight["rounds"]] == [0.0, float(NUM_CLIENTS)]
    assert resumed["rounds"][1]["previous_models"] == float(NUM_CLIENTS)
    assert straight["final_accuracy"] > 0.25  # measured 0.331; chance is 0.1


@pytest.mark.slow
def test_a_restarted_supernode_trains_against_the_previous_model_it_saved(tmp_path):
    """Three rounds on a real SuperLink and two SuperNodes (TLS, node authentication);
    SuperNode 1 restarts between rounds 2 and 3, losing its context state, and round 3 reads
    the model it saved after round 2 from its disk: the file's hash, logged as the client loads
    it, is the hash of what it saved.

    The order is forced, not raced: the ServerApp is held (SIGSTOP) until node 1 has sent its
    round-2 reply, node 1 is held until round 2 is recorded, and the ServerApp again while
    node 1 restarts, so that round 3's message waits for it under its node id."""
    from test_deployment import APP_DIR, COMPLETED, NODES, results, run_config, wait_until

    from fedhpro_lab.localfed import Credentials, LocalFederation

    def hold(pids: list[int], sig: signal.Signals) -> None:
        for pid in pids:
            os.kill(pid, sig)

    out = tmp_path / "out"
    config = run_config(out, rounds=3, strategy="moon", extra=f"data.root={tmp_path / 'disk'}")
    credentials = Credentials.create(tmp_path / "credentials", num_nodes=2)
    with LocalFederation(tmp_path / "fed", NODES, credentials) as fed:
        run_id = fed.submit(APP_DIR, config)
        wait_until(lambda: fed.node_log(1).count("Receiving: train message") >= 2,
                   "round 2's message at SuperNode 1")
        server = fed.serverapp_pids()
        assert server
        hold(server, signal.SIGSTOP)
        try:
            wait_until(lambda: fed.node_log(1).count("Sent successfully") >= 2,
                       "SuperNode 1's round-2 reply")
            fed.pause_node(1)
            hold(server, signal.SIGCONT)
            wait_until(lambda: len(results(out)["rounds"]) >= 2, "round 2 recorded")
            hold(server, signal.SIGSTOP)
            assert fed.node_log(1).count("Receiving: train message") == 2
            recorded = results(out)
            saved = PersonalModelStore(parse_experiment(recorded["config"]),
                                       recorded["experiment_id"], 1).path(2)
            digest = hashlib.sha256(saved.read_bytes()).hexdigest()
            node_id = fed.node_id(1)
            fed.restart_node(1)
            wait_until(lambda: fed.node_log(1).count("SuperNode ID") == 2, "SuperNode 1 back")
            assert fed.node_id(1) == node_id
        finally:
            hold(server, signal.SIGCONT)
        assert fed.wait(run_id, timeout=600) == COMPLETED
        restarted = fed.node_log(1).rpartition("SuperNode ID")[2]
        untouched = fed.node_log(0)
    rows = results(out)["rounds"]
    assert [r["participants"] for r in rows] == [[0, 1]] * 3
    assert all(r["left_out"] == [] for r in rows)
    assert [r["previous_models"] for r in rows] == [0.0, 2.0, 2.0]
    assert (f"partition 1 continues from its model of round 2 on disk: {saved} "
            f"(sha256 {digest})") in restarted
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == digest  # the file as saved
    assert "on disk" not in untouched  # node 0 kept its model in its context state
