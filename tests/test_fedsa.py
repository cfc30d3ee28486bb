"""FedSA: each loss term written out by hand, the gap, the anchors' initialisation and slow
update, a client update built by hand, config and payload checks, rounds through the real
client handler and strategy (the last prototypes kept between rounds, from the context state
and from the node's disk), the heterogeneous mode, and resumed runs bit for bit."""

import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import Context, RecordDict
from hand_steps import Kept, max_difference
from simulate import NUM_CLIENTS, assert_same_run, checkpoint, simulate
from test_method_round import training_message

from fedhpro_flwr.algorithms.anchors import (
    anchor_regularisation,
    calibration_loss,
    class_gap,
    fedsa_loss,
    margin_contrastive_loss,
    margin_gap,
    move_anchors,
    semantic_anchors,
)
from fedhpro_flwr.algorithms.prototypes import local_prototypes
from fedhpro_flwr.app.client import handle_train
from fedhpro_flwr.app.personal_store import PersonalModelStore
from fedhpro_flwr.app.sharing import LOCAL_MODEL, sharing_for
from fedhpro_flwr.config import ConfigError
from fedhpro_flwr.data.federated import client_data, dataset_spec
from fedhpro_flwr.methods import ClientTask, get_method, parse_experiment
from fedhpro_flwr.methods.fedsa import ANCHOR_RECORD, PREVIOUS_ROUND, received_anchors
from fedhpro_flwr.methods.payload import (
    ClassRows,
    NonFinite,
    PayloadError,
    encode_class_rows,
    tensors_to_record,
)
from fedhpro_flwr.methods.prototype import LOCAL_RECORD
from fedhpro_flwr.methods.strategy import ClientReply

pytestmark = pytest.mark.usefixtures("serverapp_identity")

FEDSA = get_method("fedsa")
SAMPLES = 48  # one batch: one SGD step per local epoch
BACKBONES = "cnn-8,cnn-16,resnet10-4"


def fedsa_cfg(root, **sections):
    return parse_experiment({"partition": {"num_partitions": NUM_CLIENTS},
                             "data": {"root": str(root)}, "train": {"local_epochs": 1},
                             **sections})


def hand_ce(logits: list[list[float]], labels: list[int]) -> float:
    """Cross-entropy written out: mean of -logit_y + log sum_c exp(logit_c)."""
    return sum(-row[y] + math.log(sum(math.exp(v) for v in row))
               for row, y in zip(logits, labels, strict=True)) / len(labels)


# three classes in two dimensions, and a linear head with known weights
ANCHORS = torch.tensor([[1.0, 2.0], [0.0, 1.0], [2.0, 0.0]])
Z = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
Y = torch.tensor([2, 0])
W, B = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.0, 0.5, -1.0]


def head() -> torch.nn.Linear:
    linear = torch.nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(W))
        linear.bias.copy_(torch.tensor(B))
    return linear


def hand_logits(points: list[list[float]]) -> list[list[float]]:
    return [[sum(w * p for w, p in zip(row, point, strict=True)) + b
             for row, b in zip(W, B, strict=True)] for point in points]


def hand_margin_contrastive(gap: float) -> float:
    distances = [[math.dist(z, a) for a in ANCHORS.tolist()] for z in Z.tolist()]
    logits = [[-(d + (gap if c == y else 0.0)) for c, d in enumerate(row)]
              for row, y in zip(distances, Y.tolist(), strict=True)]
    return hand_ce(logits, Y.tolist())


# ---- each term by hand ---------------------------------------------------------------------

def test_the_calibration_term_is_the_heads_ce_on_the_anchors():
    want = hand_ce(hand_logits(ANCHORS.tolist()), [0, 1, 2])
    assert calibration_loss(head(), ANCHORS).item() == pytest.approx(want, rel=1e-6)


def test_the_regularisation_term_is_the_mse_to_the_own_class_anchor():
    # z0 - a_2 = (-1, 2), z1 - a_0 = (2, -1): (1 + 4 + 4 + 1) / 4 entries
    assert anchor_regularisation(Z, Y, ANCHORS).item() == pytest.approx(2.5)


def test_the_margin_contrastive_term_adds_the_gap_to_the_own_anchors_distance():
    for gap in (0.0, 0.5, 3.0):
        got = margin_contrastive_loss(Z, Y, ANCHORS, gap).item()
        assert got == pytest.approx(hand_margin_contrastive(gap), rel=1e-6)
    # a margin makes the own class harder to win
    assert hand_margin_contrastive(3.0) > hand_margin_contrastive(0.5)


def test_the_loss_is_ce_plus_the_weighted_terms():
    gap = 0.5
    ce = hand_ce(hand_logits(Z.tolist()), Y.tolist())
    calibration = hand_ce(hand_logits(ANCHORS.tolist()), [0, 1, 2])
    contrastive = hand_margin_contrastive(gap)
    total, ce_part = fedsa_loss(Z, Y, head(), ANCHORS, gap, cc=0.5, lam=2.0, mcl=3.0)
    assert ce_part.item() == pytest.approx(ce, rel=1e-6)
    assert total.item() == pytest.approx(ce + 0.5 * calibration + 2.0 * 2.5 + 3.0 * contrastive,
                                         rel=1e-6)
    alone, _ = fedsa_loss(Z, Y, head(), ANCHORS, gap, cc=0.0, lam=0.0, mcl=0.0)
    assert alone.item() == pytest.approx(ce, rel=1e-6)


# ---- the gap -------------------------------------------------------------------------------

def test_the_gap_is_the_mean_distance_to_the_nearest_other_class():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    # nearest others: 3 (0-1), 3 (1-0), 4 (2-0)
    assert class_gap(points) == pytest.approx(10 / 3)
    assert class_gap(points[:1]) == float("-inf")  # one class: no gap
    spread_out = points * 10  # local gap 33.3 beats the anchors' 10/3
    assert margin_gap(None, points) == pytest.approx(10 / 3)  # no prototypes yet: global
    assert margin_gap(spread_out, points) == pytest.approx(100 / 3)
    assert margin_gap(points / 10, points) == pytest.approx(10 / 3)
    assert margin_gap(points[:1], points) == pytest.approx(10 / 3)


# ---- the anchors ---------------------------------------------------------------------------

def hand_anchors(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """randn(C, d) through Linear-BN-ReLU-Linear-BN-ReLU written out: the Linears drawn with
    PyTorch's default init in order, BatchNorm over the C rows with their batch statistics."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)]  # drawn first, as its code
    x = torch.randn(num_classes, dim)
    with torch.no_grad():
        for layer in layers:
            h = x @ layer.weight.T + layer.bias
            h = (h - h.mean(dim=0)) / torch.sqrt(h.var(dim=0, unbiased=False) + 1e-5)
            x = h.clamp(min=0.0)
    return x


def test_anchors_are_seeded_projected_noise_and_non_negative():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    anchors = semantic_anchors(10, 16, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    assert anchors.shape == (10, 16) and not anchors.requires_grad
    assert (anchors >= 0).all()
    # BatchNorm over the classes, then ReLU: every coordinate is zero for some class and
    # positive for another
    assert (anchors == 0).any(dim=0).all() and (anchors > 0).any(dim=0).all()
    assert torch.allclose(anchors, hand_anchors(10, 16, 3), atol=1e-5)
    torch.rand(5)  # whatever ran before, the same seed gives the same anchors
    assert torch.equal(semantic_anchors(10, 16, seed=3), anchors)
    assert not torch.allclose(semantic_anchors(10, 16, seed=4), anchors)
    cfg = parse_experiment({"seed": 3})
    strategy = FEDSA.make_strategy(cfg, {}, 10, 16)
    assert torch.equal(strategy.anchors, anchors)  # the server's come from the run's seed
    with pytest.raises(ValueError, match="at least two classes"):
        semantic_anchors(1, 16, seed=3)


def reply(pid: int, protos: list[list[float]], counts: list[int]) -> ClientReply:
    counts_t = torch.tensor(counts)
    rows = ClassRows(counts_t > 0, {"prototypes": torch.tensor(protos)}, counts_t)
    return ClientReply(100 + pid, pid, int(counts_t.sum()), {}, {"fedsa_gap": 1.0}, rows)


def server_step(momentum: float | None):
    keys = {} if momentum is None else {"fedsa": {"anchor_momentum": momentum}}
    strategy = FEDSA.make_strategy(parse_experiment(keys), {}, 3, 2)
    strategy.anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # class 0 held by both clients (10 and 1 samples), class 1 by one, class 2 by none
    replies = [reply(0, [[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]], [10, 5, 0]),
               reply(1, [[3.0, 5.0], [0.0, 0.0], [0.0, 0.0]], [1, 0, 0])]
    strategy.server_step(1, {}, replies)
    return strategy


def test_the_server_averages_prototypes_unweighted_and_moves_the_anchors_slowly():
    strategy = server_step(0.9)
    # the plain mean over the holders: ((1, 1) + (3, 5)) / 2, not weighted 10 : 1
    assert torch.allclose(strategy.prototypes, torch.tensor([[2.0, 3.0], [2.0, 0.0],
                                                             [0.0, 0.0]]))
    assert strategy.present.tolist() == [True, True, False]
    # 0.9 a + 0.1 p for the classes with a prototype; class 2 keeps its anchor
    assert torch.allclose(strategy.anchors, torch.tensor([[1.1, 0.3], [0.2, 0.9], [1.0, 1.0]]))
    default = server_step(None)  # 0.9999, as FedSA's code
    assert torch.allclose(default.anchors, torch.tensor([[1.0001, 0.0003], [0.0002, 0.9999],
                                                         [1.0, 1.0]]), atol=1e-7)
    anchors, present = default.global_anchors()  # what the diagnostics measure
    assert torch.equal(anchors, default.anchors) and present.all()
    assert torch.equal(move_anchors(default.anchors, default.prototypes, default.present, 1.0),
                       default.anchors)  # momentum 1: fixed anchors


def test_strategy_state_round_trips_and_is_checked():
    strategy = server_step(0.9)
    fresh = FEDSA.make_strategy(parse_experiment({}), {}, 3, 2)
    fresh.load_state_dict(strategy.state_dict())
    for key, value in strategy.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(ValueError, match="'anchors' is missing"):
        fresh.load_state_dict({k: v for k, v in strategy.state_dict().items() if k != "anchors"})


# ---- config and payloads -------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value"), [("cc", -1.0), ("lam", -0.1), ("mcl", -2.0),
                                            ("anchor_momentum", 1.5),
                                            ("anchor_momentum", -0.1)])
def test_bad_settings_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=rf"fedsa\.{key}.*{value}"):
        parse_experiment({"fedsa": {key: value}})


def test_malformed_uploads_and_anchors_are_rejected(tmp_path):
    strategy = FEDSA.make_strategy(fedsa_cfg(tmp_path), {}, 10, 8)
    present = torch.zeros(10, dtype=torch.bool)
    present[:3] = True
    counts = present.long() * 4

    def content(protos):
        return RecordDict({LOCAL_RECORD: encode_class_rows(present, {"prototypes": protos},
                                                           counts)})

    good = strategy.decode_extra(content(torch.ones(10, 8)))
    assert good.present.tolist() == present.tolist()
    with pytest.raises(PayloadError, match="lacks the 'local-prototypes' record"):
        strategy.decode_extra(RecordDict())
    with pytest.raises(PayloadError, match="shape"):
        strategy.decode_extra(content(torch.ones(10, 7)))
    with pytest.raises(NonFinite):
        strategy.decode_extra(content(torch.full((10, 8), float("nan"))))

    cfg = fedsa_cfg(tmp_path)
    model = sharing_for(cfg, FEDSA).server_model(dataset_spec(cfg))
    data = client_data(cfg, 0)

    def task(records):
        return ClientTask(model, data, RecordDict(records), cfg, torch.device("cpu"),
                          torch.Generator())

    d = model.feature_dim
    assert received_anchors(task({ANCHOR_RECORD: tensors_to_record(
        {"anchors": torch.ones(10, d)})})).shape == (10, d)
    with pytest.raises(PayloadError, match="lacks the 'semantic-anchors' record"):
        received_anchors(task({}))
    with pytest.raises(PayloadError, match="shape"):
        received_anchors(task({ANCHOR_RECORD: tensors_to_record({"anchors": torch.ones(9, d)})}))
    with pytest.raises(NonFinite):
        received_anchors(task({ANCHOR_RECORD: tensors_to_record(
            {"anchors": torch.full((10, d), float("inf"))})}))


# ---- a client update built by hand ---------------------------------------------------------

def one_step(tmp_path, **fedsa_keys):
    return fedsa_cfg(tmp_path, train={"local_epochs": 1, "batch_size": SAMPLES, "lr": 0.1},
                     fedsa={"cc": 0.5, "lam": 2.0, "mcl": 3.0, **fedsa_keys})


def fresh_model(cfg):
    torch.manual_seed(cfg.seed)
    return sharing_for(cfg, FEDSA).server_model(dataset_spec(cfg))


def client_update(cfg, kept, scale=1.0):
    model = fresh_model(cfg)
    anchors = scale * semantic_anchors(10, model.feature_dim, cfg.seed)
    data = client_data(cfg, 0).subset(torch.arange(SAMPLES).numpy())
    content = RecordDict({ANCHOR_RECORD: tensors_to_record({"anchors": anchors})})
    records, metrics = FEDSA.client_train(ClientTask(model, data, content, cfg,
                                                     torch.device("cpu"),
                                                     torch.Generator().manual_seed(11), kept))
    return model, anchors, data, records, metrics


def hand_step(cfg, anchors, gap):
    """One full-batch SGD step on the loss written out from FedSA's equations."""
    fedsa, model = cfg.section(get_method("fedsa").section), fresh_model(cfg)
    data = client_data(cfg, 0).subset(torch.arange(SAMPLES).numpy())
    z = model.features(data.x)
    ce = F.cross_entropy(model.classifier(z), data.y)
    calibration = F.cross_entropy(model.classifier(anchors), torch.arange(10))
    regularisation = ((z - anchors[data.y]) ** 2).mean()
    distance = ((z[:, None, :] - anchors[None]) ** 2).sum(dim=-1).sqrt()
    contrastive = F.cross_entropy(-(distance + gap * F.one_hot(data.y, 10)), data.y)
    loss = ce + fedsa.cc * calibration + fedsa.lam * regularisation + fedsa.mcl * contrastive
    params = list(model.parameters())
    with torch.no_grad():
        for param, grad in zip(params, torch.autograd.grad(loss, params), strict=True):
            param -= cfg.train.lr * grad
    return model.state_dict()



def test_a_client_update_is_the_hand_built_step_with_the_global_gap_first(tmp_path):
    cfg = one_step(tmp_path)
    kept = Kept(None)  # the client's first round: no prototypes of its own yet
    model, anchors, data, records, metrics = client_update(cfg, kept)
    assert metrics["fedsa_gap"] == pytest.approx(class_gap(anchors))
    assert metrics[PREVIOUS_ROUND] == 0.0
    assert max_difference(model.state_dict(), hand_step(cfg, anchors, class_gap(anchors))) < 1e-6
    assert max_difference(model.state_dict(), hand_step(cfg, anchors, 0.0)) > 1e-5  # the gap
    # it uploads and keeps the trained model's class means
    protos, counts = local_prototypes(model, data, torch.device("cpu"))
    assert torch.equal(kept.saved["prototypes"], protos)
    assert torch.equal(kept.saved["counts"], counts)
    sent = records[LOCAL_RECORD].to_torch_state_dict()
    assert torch.equal(sent["classes"], torch.nonzero(counts).flatten())
    assert torch.equal(sent["prototypes"], protos[counts > 0])
    # every weight moves the update well beyond the tolerance above
    for keys in ({"cc": 0.0}, {"lam": 0.0}, {"mcl": 0.0}):
        other, *_ = client_update(one_step(tmp_path, **keys), Kept(None))
        assert max_difference(other.state_dict(), model.state_dict()) > 1e-5, keys


def test_the_local_gap_comes_from_the_prototypes_it_kept_last_round(tmp_path):
    """Anchors at a tenth of their scale (gap 0.87): at their own (8.7, the features' distance
    to them 16.5) the own class's logit is already so far behind that a larger gap changes
    the step by under 1e-6 (measured), so only a gap of a few units is visible in it."""
    cfg = one_step(tmp_path)
    scale = 0.1
    _, anchors, *_ = client_update(cfg, Kept(None), scale)
    # prototypes 3 apart of three classes (the others absent), and one stray row of an
    # absent class that must not count
    protos = torch.zeros(10, anchors.shape[1])
    protos[0, 0] = protos[1, 1] = protos[2, 2] = 3 / math.sqrt(2)
    protos[5, 3] = 0.01
    counts = torch.tensor([4, 4, 4, 0, 0, 0, 0, 0, 0, 0])
    local = class_gap(protos[:3])
    assert local == pytest.approx(3.0) and local > class_gap(anchors)
    model, _, _, _, metrics = client_update(cfg, Kept((3, {"prototypes": protos,
                                                           "counts": counts})), scale)
    assert metrics["fedsa_gap"] == pytest.approx(local) and metrics[PREVIOUS_ROUND] == 3.0
    assert max_difference(model.state_dict(), hand_step(cfg, anchors, local)) < 1e-6
    first, *_ = client_update(cfg, Kept(None), scale)  # the global gap instead
    assert max_difference(first.state_dict(), model.state_dict()) > 1e-5
    with pytest.raises(ValueError, match="kept FedSA prototypes of round 3"):
        client_update(cfg, Kept((3, {"weight": protos})))


# ---- rounds through the real client handler and strategy ------------------------------------

def contexts(num: int = NUM_CLIENTS):
    return [Context(run_id=1, node_id=100 + pid, state=RecordDict(), run_config={},
                    node_config={"partition-id": pid, "num-partitions": NUM_CLIENTS})
            for pid in range(num)]


def train_round(strategy, weights, cfg, nodes, server_round, experiment):
    replies = []
    for pid, context in enumerate(nodes):
        message = training_message("fedsa", strategy, tensors_to_record(weights), 100 + pid,
                                   cfg, server_round, experiment)
        answer = handle_train(message, context)
        assert not answer.has_error(), answer.error
        replies.append(answer)
    return replies


def metric(answer, key):
    return answer.content.metric_records["metrics"][key]


def uploaded(answer) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the classes a reply holds, their class ids)."""
    record = answer.content.array_records[LOCAL_RECORD].to_torch_state_dict()
    return record["prototypes"], record["classes"]


def test_two_global_model_rounds_move_the_anchors_and_use_last_rounds_prototypes(tmp_path):
    cfg = fedsa_cfg(tmp_path)
    model = fresh_model(cfg)
    weights = model.state_dict()
    strategy = FEDSA.make_strategy(cfg, weights, 10, model.feature_dim)
    sent = strategy.anchors.clone()
    nodes = contexts()
    first = train_round(strategy, weights, cfg, nodes, 1, "fedsa-rounds")
    assert [metric(r, PREVIOUS_ROUND) for r in first] == [0.0] * NUM_CLIENTS
    assert all(metric(r, "fedsa_gap") == pytest.approx(class_gap(sent)) for r in first)
    arrays, _ = strategy.aggregate_train(1, first)
    assert arrays is not None and strategy.report.left_out == []

    # the server: the plain mean of the uploads per class, then 0.9999 a + 0.0001 p
    sums, holders = torch.zeros_like(sent), torch.zeros(10)
    for answer in first:
        rows, classes = uploaded(answer)
        sums[classes] += rows
        holders[classes] += 1
    mean = sums / holders.clamp(min=1)[:, None]
    assert torch.allclose(strategy.prototypes, mean, atol=1e-6)
    held = holders > 0
    want = torch.where(held[:, None], 0.9999 * sent + 0.0001 * mean, sent)
    assert torch.allclose(strategy.anchors, want, atol=1e-6)
    assert not torch.equal(strategy.anchors, sent)
    row = strategy.report.row()
    assert row["fedsa_global_gap"] == pytest.approx(class_gap(strategy.anchors))
    assert row["prototype_classes"] == float(held.sum())

    second = train_round(strategy, arrays.to_torch_state_dict(), cfg, nodes, 2, "fedsa-rounds")
    assert [metric(r, PREVIOUS_ROUND) for r in second] == [1.0] * NUM_CLIENTS
    for before, after in zip(first, second, strict=True):
        own = uploaded(before)[0]  # what it sent in round 1 is what it kept
        want_gap = max(class_gap(own), class_gap(strategy.anchors))
        assert metric(after, "fedsa_gap") == pytest.approx(want_gap, rel=1e-5)
    # new node states (a restarted SuperNode, a resumed run): the same from the node's disk
    again = train_round(strategy, arrays.to_torch_state_dict(), cfg, contexts(), 2,
                        "fedsa-rounds")
    for straight, replayed in zip(second, again, strict=True):
        assert metric(replayed, PREVIOUS_ROUND) == 1.0
        assert metric(replayed, "fedsa_gap") == metric(straight, "fedsa_gap")
        assert torch.equal(uploaded(replayed)[0], uploaded(straight)[0])


def test_heterogeneous_clients_share_only_prototypes_and_keep_both_model_and_prototypes(
        tmp_path):
    cfg = parse_experiment({"partition": {"num_partitions": NUM_CLIENTS},
                            "data": {"root": str(tmp_path)}, "model": {"backbones": BACKBONES},
                            "train": {"local_epochs": 1}})
    mode = sharing_for(cfg, FEDSA)
    server = mode.server_model(dataset_spec(cfg))
    shared = mode.shared(server.state_dict())
    assert shared == {}  # no weights travel
    strategy = FEDSA.make_strategy(cfg, shared, 10, server.feature_dim)
    nodes = contexts()
    first = train_round(strategy, shared, cfg, nodes, 1, "fedsa-hetero")
    for answer in first:
        assert len(answer.content.array_records["arrays"]) == 0
        assert uploaded(answer)[0].shape[1] == cfg.model.feature_dim  # whatever the backbone
    assert strategy.aggregate_train(1, first)[0] is not None
    personal = strategy.report.personal
    assert personal is not None and sorted(personal.by_partition) == ["0", "1", "2"]
    # on disk, the personal model and the kept prototypes each in a folder of their own
    for pid, answer in enumerate(first):
        model = PersonalModelStore(cfg, "fedsa-hetero", pid).latest(1)
        kept = PersonalModelStore(cfg, "fedsa-hetero-kept", pid).latest(1)
        assert model is not None and kept is not None
        assert set(kept) == {"prototypes", "counts"} and "classifier.weight" in model
        rows, classes = uploaded(answer)
        assert torch.equal(kept["prototypes"][classes], rows)
        assert LOCAL_MODEL in nodes[pid].state.array_records
    second = train_round(strategy, shared, cfg, nodes, 2, "fedsa-hetero")
    fresh = train_round(strategy, shared, cfg, contexts(), 2, "fedsa-hetero")
    for before, after, replayed in zip(first, second, fresh, strict=True):
        want_gap = max(class_gap(uploaded(before)[0]), class_gap(strategy.anchors))
        assert metric(after, "fedsa_gap") == pytest.approx(want_gap, rel=1e-5)
        assert metric(after, PREVIOUS_ROUND) == metric(replayed, PREVIOUS_ROUND) == 1.0
        assert metric(replayed, "local_model_restored") == 1.0
        assert metric(replayed, "local_accuracy") == metric(after, "local_accuracy")


# ---- simulations ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_resumed_heterogeneous_fedsa_run_replays_the_uninterrupted_one(tmp_path):
    overrides = (f"partition.num_partitions={NUM_CLIENTS} train.local_epochs=1 "
                 f"federation.min_train_nodes={NUM_CLIENTS} model.backbones={BACKBONES}")
    straight = simulate(tmp_path / "straight", rounds=3, strategy="fedsa", overrides=overrides)
    simulate(tmp_path / "resumed", rounds=2, strategy="fedsa", overrides=overrides)
    simulate(tmp_path / "resumed", rounds=3, strategy="fedsa", resume=True, overrides=overrides)
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")
    state = checkpoint(tmp_path / "straight")["strategy_state"]
    assert set(state) == {"anchors", "prototypes", "present"}
    assert state["present"].all() and (state["anchors"] >= 0).all()
    for row in straight["rounds"][1:]:  # every client used its own last prototypes
        assert row["fedsa_local_gaps"] == float(NUM_CLIENTS)
    assert straight["final_accuracy"] > 0.2
