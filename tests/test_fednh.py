"""FedNH: its logits and loss written out by hand, the orthonormal start of the prototypes, a
client update and upload built by hand, the server's smoothed update on known inputs, its
config's errors, malformed uploads rejected, rounds through the real client handler and
strategy (and the ServerApp's own loop over a grid of real messages), and a resumed run whose
prototypes are the uninterrupted run's, bit for bit."""

import math
from pathlib import Path
from uuid import uuid4

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Context, Message, RecordDict
from hand_steps import max_difference, state_of
from simulate import NUM_CLIENTS, assert_same_run, checkpoint
from test_method_round import WholeGrid
from torch import nn

from fedhpro_flwr.algorithms.fednh import (
    CosineBackbone,
    orthonormal_prototypes,
    scaled_class_means,
    smoothed_prototypes,
)
from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.app.client import handle_train
from fedhpro_flwr.app.server import run_experiment
from fedhpro_flwr.app.sharing import sharing_for
from fedhpro_flwr.config import EXPERIMENT_ID_KEY, STRATEGY_KEY, ConfigError, resolve_run_config
from fedhpro_flwr.data.federated import client_data, dataset_spec, held_out_data
from fedhpro_flwr.methods import SECTIONS, ClientTask, get_method, parse_experiment
from fedhpro_flwr.methods.fednh import MEANS_RECORD, PROTOTYPES_RECORD, SCALE_KEY, FedNHConfig
from fedhpro_flwr.methods.payload import PayloadError, tensors_to_record

pytestmark = pytest.mark.usefixtures("serverapp_identity")

FEDNH = get_method("fednh")
APP_DIR = Path(__file__).resolve().parents[1]
SAMPLES = 48  # one batch: one SGD step per local epoch, so the update is one gradient
NODES = [100 + pid for pid in range(NUM_CLIENTS)]


def fednh_cfg(root, train=None, **fednh):
    return parse_experiment({"partition": {"num_partitions": NUM_CLIENTS},
                             "data": {"root": str(root)},
                             "train": train or {"local_epochs": 1}, "fednh": fednh})


def fednh_model(cfg) -> CosineBackbone:
    torch.manual_seed(cfg.seed)
    model = sharing_for(cfg, FEDNH).server_model(dataset_spec(cfg))
    assert isinstance(model, CosineBackbone)
    return model




def unit(t: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1, written out (not F.normalize, which the module uses)."""
    return t / t.pow(2).sum(dim=-1, keepdim=True).sqrt()


# ---- the model: logits and loss ------------------------------------------------------------

class Features(Backbone):
    """A backbone whose features are its inputs times a weight: logits by hand."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.feature_dim = dim
        self.weight = nn.Parameter(torch.ones(()))
        self.classifier = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_the_logits_and_loss_written_out_by_hand():
    model = CosineBackbone(Features(3, 2), scale=2.5, learn_scale=True)
    prototypes = [[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]]
    model.set_prototypes(torch.tensor(prototypes))
    x = [[3.0, 4.0, 0.0], [1.0, 0.0, -1.0], [0.0, -2.0, 0.5]]
    y = [1, 0, 1]

    want, losses = [], []
    for row, label in zip(x, y, strict=True):
        length = math.sqrt(sum(v * v for v in row))
        logits = [2.5 * sum(v * p for v, p in zip(row, proto, strict=True)) / length
                  for proto in prototypes]
        want.append(logits)
        losses.append(-logits[label] + math.log(sum(math.exp(v) for v in logits)))
    inputs = torch.tensor(x)
    got = model(inputs)
    assert torch.allclose(got, torch.tensor(want), rtol=1e-6, atol=1e-6)
    assert torch.equal(got, model.classifier(model.features(inputs)))
    loss = F.cross_entropy(got, torch.tensor(y))
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    # cosines: the features' length does not matter, the scale does, linearly
    assert torch.allclose(model(7.0 * inputs), got, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        model.classifier.scale.fill_(5.0)
    assert torch.allclose(model(inputs), 2 * got, rtol=1e-6, atol=1e-6)


def test_the_model_is_the_backbone_with_fednhs_head(tmp_path):
    cfg = fednh_cfg(tmp_path)
    model = fednh_model(cfg)
    state = model.state_dict()
    # the backbone's own linear head is gone; the scale is a weight, the prototypes are not
    assert not any("backbone.classifier" in k for k in state)
    assert SCALE_KEY in state and state[SCALE_KEY].item() == 1.0
    assert not any("prototypes" in k for k in state)
    assert "classifier.prototypes" not in dict(model.named_parameters())
    assert model.classifier.scale.requires_grad
    assert torch.isnan(model.classifier.prototypes).all()  # until the server's arrive
    # the same extractor every other method draws from the seed
    torch.manual_seed(cfg.seed)
    fedavg = sharing_for(cfg, get_method("fedavg")).server_model(dataset_spec(cfg))
    assert all(torch.equal(v, state[f"backbone.{k}"]) for k, v in fedavg.state_dict().items()
               if not k.startswith("classifier"))
    fixed = fednh_model(fednh_cfg(tmp_path, scale=30.0, learn_scale=False))
    assert fixed.classifier.scale.item() == 30.0 and not fixed.classifier.scale.requires_grad


def test_prototypes_start_orthonormal_and_follow_the_seed(tmp_path):
    p = orthonormal_prototypes(10, 128, torch.Generator().manual_seed(536))
    assert p.shape == (10, 128) and p.dtype == torch.float32
    assert torch.allclose(p @ p.T, torch.eye(10), atol=1e-6)
    assert torch.equal(p, orthonormal_prototypes(10, 128, torch.Generator().manual_seed(536)))
    assert not torch.allclose(p, orthonormal_prototypes(10, 128,
                                                        torch.Generator().manual_seed(537)))
    square = orthonormal_prototypes(6, 6, torch.Generator().manual_seed(1))
    assert torch.allclose(square @ square.T, torch.eye(6), atol=1e-6)
    # more classes than dimensions: unit rows spanning the whole space
    many = orthonormal_prototypes(20, 8, torch.Generator().manual_seed(1))
    assert torch.allclose(many.norm(dim=1), torch.ones(20), atol=1e-6)
    assert torch.linalg.matrix_rank(many) == 8
    # the strategy's are drawn from the experiment's seed
    cfg = fednh_cfg(tmp_path)
    model = fednh_model(cfg)
    strategy = FEDNH.make_strategy(cfg, model.state_dict(), 10, model.feature_dim)
    assert torch.equal(strategy.prototypes, orthonormal_prototypes(
        10, model.feature_dim, torch.Generator().manual_seed(cfg.seed)))


# ---- the client: one step and the upload, by hand ------------------------------------------

def one_step(root, **fednh):
    return fednh_cfg(root, {"local_epochs": 1, "batch_size": SAMPLES, "lr": 0.1}, **fednh)


def some_prototypes(dim: int) -> torch.Tensor:
    return orthonormal_prototypes(10, dim, torch.Generator().manual_seed(5))


def client_update(cfg):
    """FedNH's client trainer from the seeded model on a client's first SAMPLES samples:
    (trained model, its upload record, metrics)."""
    model = fednh_model(cfg)
    data = client_data(cfg, 0).subset(torch.arange(SAMPLES).numpy())
    content = RecordDict({PROTOTYPES_RECORD: tensors_to_record(
        {"prototypes": some_prototypes(model.feature_dim)})})
    task = ClientTask(model, data, content, cfg, torch.device("cpu"),
                      torch.Generator().manual_seed(11))
    records, metrics = FEDNH.client_train(task)
    return model, records[MEANS_RECORD], metrics


def hand_built_step(cfg) -> tuple[dict[str, torch.Tensor], float]:
    """One SGD step on CE(s * unit(f) @ P^T, y), the gradient clipped to max_grad_norm: (the
    stepped weights, the gradient's norm before clipping)."""
    fednh, lr = cfg.section(FedNHConfig), cfg.train.lr
    model = fednh_model(cfg)
    data = client_data(cfg, 0).subset(torch.arange(SAMPLES).numpy())
    prototypes = some_prototypes(model.feature_dim)
    scale = model.classifier.scale
    logits = scale * unit(model.backbone.features(data.x)) @ prototypes.T
    loss = F.cross_entropy(logits, data.y)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    clip = min(1.0, fednh.max_grad_norm / (norm + 1e-6))
    stepped = {k: (p - lr * clip * g).detach()
               for (k, p), g in zip(params.items(), grads, strict=True)}
    return {**state_of(model), **stepped}, norm


def test_a_client_update_is_the_hand_built_step_with_clipping_and_frozen_prototypes(tmp_path):
    clipped = one_step(tmp_path, max_grad_norm=0.05)
    want, norm = hand_built_step(clipped)
    assert norm > 0.05 * 4  # the clipping acts, and strongly
    model, _, metrics = client_update(clipped)
    assert max_difference(state_of(model), want) < 1e-6
    assert metrics["train_loss"] == metrics["train_ce"]  # plain CE: no other term
    assert torch.equal(model.classifier.prototypes, some_prototypes(model.feature_dim))
    assert model.classifier.scale.item() != 1.0  # the scale is learnt...
    # ...and clipping changes the step far beyond the tolerance above
    unclipped, norm_at_default = hand_built_step(one_step(tmp_path))
    assert norm_at_default < 10.0  # the default norm leaves this step whole
    assert max_difference(unclipped, want) > 1e-4
    assert max_difference(state_of(client_update(one_step(tmp_path))[0]), unclipped) < 1e-6
    fixed = one_step(tmp_path, scale=30.0, learn_scale=False)
    fixed_model = client_update(fixed)[0]
    assert fixed_model.classifier.scale.item() == 30.0
    assert max_difference(state_of(fixed_model), hand_built_step(fixed)[0]) < 1e-6


def test_the_upload_is_each_classs_renormalised_mean_of_unit_features_times_its_count(
        tmp_path):
    cfg = one_step(tmp_path)
    model, record, _ = client_update(cfg)
    data = client_data(cfg, 0).subset(torch.arange(SAMPLES).numpy())
    with torch.no_grad():
        features = unit(model.eval().backbone.features(data.x))
    sent = record.to_torch_state_dict()
    counts = torch.bincount(data.y, minlength=10)
    assert torch.equal(sent["counts"], counts)
    assert sent["classes"].tolist() == torch.nonzero(counts).flatten().tolist()
    assert len(set(counts[sent["classes"]].tolist())) >= 2  # classes of different counts
    for row, c in zip(sent["scaled_means"], sent["classes"].tolist(), strict=True):
        mean = features[data.y == c].mean(dim=0)
        assert torch.allclose(row, unit(mean) * counts[c], atol=1e-5)
    # the closed form on small tensors: classes without samples stay zero rows
    means = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    got = scaled_class_means(means, torch.tensor([2, 0, 5]))
    assert torch.allclose(got, torch.tensor([[1.2, 1.6], [0.0, 0.0], [-5.0, 0.0]]))


# ---- the server's update -----------------------------------------------------------------

def test_the_server_update_on_known_inputs():
    """Three classes in 3-D, P the unit vectors. Client A holds class 0 (1 sample, direction
    e2) and class 1 (2 samples, e3); client B class 0 (3 samples, e3); nobody class 2."""
    p = torch.eye(3)
    e2, e3 = [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    scaled = torch.tensor([[[1 * v for v in e2], [2 * v for v in e3], [0.0] * 3],
                           [[3 * v for v in e3], [0.0] * 3, [0.0] * 3]])
    counts = torch.tensor([[1, 2, 0], [3, 0, 0]])

    new, held = smoothed_prototypes(p, scaled, counts, rho=0.9)
    assert held.tolist() == [True, True, False]
    # class 0: the count-weighted direction (0, 1, 3) / sqrt(10), then 0.9 e1 + 0.1 of it
    a, b, c = 0.9, 0.1 * 1 / math.sqrt(10), 0.1 * 3 / math.sqrt(10)
    length = math.sqrt(a * a + b * b + c * c)
    assert new[0].tolist() == pytest.approx([a / length, b / length, c / length], rel=1e-6)
    # class 1: 0.9 e2 + 0.1 e3
    assert new[1].tolist() == pytest.approx([0.0, 0.9 / math.sqrt(0.82), 0.1 / math.sqrt(0.82)],
                                            rel=1e-6)
    assert torch.equal(new[2], p[2])  # held by nobody: kept as it was
    # bit for bit, not re-normalised (which moves these rows in their last bits)
    rotated = orthonormal_prototypes(3, 3, torch.Generator().manual_seed(2))
    assert not torch.equal(F.normalize(0.9 * rotated[2], dim=0), rotated[2])
    assert torch.equal(smoothed_prototypes(rotated, scaled, counts, 0.9)[0][2], rotated[2])
    # rho = 0: the prototypes are the clients' directions themselves
    target, _ = smoothed_prototypes(p, scaled, counts, rho=0.0)
    assert target[0].tolist() == pytest.approx([0.0, 1 / math.sqrt(10), 3 / math.sqrt(10)],
                                               rel=1e-6)
    # the counts weigh the clients: equal weights would give (0, 1, 1) / sqrt(2)
    equal = torch.tensor([[e2, e3, [0.0] * 3], [e3, [0.0] * 3, [0.0] * 3]])
    assert smoothed_prototypes(p, equal, counts, 0.0)[0][0].tolist() == pytest.approx(
        [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-6)


def test_its_config_has_its_codes_defaults_and_clear_errors():
    assert FedNHConfig() == FedNHConfig(rho=0.9, scale=1.0, learn_scale=True,
                                        max_grad_norm=10.0)
    assert parse_experiment({"fednh": {"rho": 0.0}}).section(FedNHConfig).rho == 0.0
    for rho in (1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=rf"'fednh.rho' = {rho}: must be in \[0, 1\)"):
            parse_experiment({"fednh": {"rho": rho}})
    for key, value, message in (("scale", 0.0, "must be > 0"),
                                ("max_grad_norm", 0.0, "must be > 0"),
                                ("rho", "high", "expected a number")):
        with pytest.raises(ConfigError, match=f"'fednh.{key}' = {value!r}: {message}"):
            parse_experiment({"fednh": {key: value}})
    with pytest.raises(ConfigError, match="strategy 'fednh' averages the clients' model"):
        sharing_for(parse_experiment({"model": {"backbones": "cnn-8,cnn-16"}}), FEDNH)


# ---- rounds through the real client handler and strategy ---------------------------------

def contexts() -> list[Context]:
    return [Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                    node_config={"partition-id": pid, "num-partitions": NUM_CLIENTS})
            for pid, node in enumerate(NODES)]


def first_round(cfg):
    """Round 1's messages as the strategy sends them, and every client's reply."""
    model = fednh_model(cfg)
    strategy = FEDNH.make_strategy(cfg, model.state_dict(), 10, model.feature_dim)
    config = ConfigRecord({STRATEGY_KEY: "fednh", EXPERIMENT_ID_KEY: "fednh-round",
                           **dataset_spec(cfg).to_config()})
    messages = list(strategy.configure_train(1, tensors_to_record(model.state_dict()), config,
                                             WholeGrid(NODES)))
    for message in messages:
        message.metadata.__dict__["_message_id"] = uuid4().hex  # as a grid sets it
    replies = [handle_train(m, c) for m, c in zip(messages, contexts(), strict=True)]
    assert not any(r.has_error() for r in replies)
    return model, strategy, messages, replies


def test_a_round_sends_p_smooths_it_towards_the_uploads_and_evaluates_with_it(tmp_path):
    cfg = fednh_cfg(tmp_path)
    model, strategy, messages, replies = first_round(cfg)
    start = strategy.prototypes.clone()
    for message in messages:
        sent = message.content.array_records[PROTOTYPES_RECORD].to_torch_state_dict()
        assert torch.equal(sent["prototypes"], start)
    for reply in replies:  # the weights travel without the prototypes
        assert not any("prototypes" in k for k in reply.content.array_records["arrays"])

    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    uploads = [r.content.array_records[MEANS_RECORD].to_torch_state_dict() for r in replies]
    total = torch.zeros(10, model.feature_dim)
    held = torch.zeros(10, dtype=torch.bool)
    for upload in uploads:
        total[upload["classes"]] += upload["scaled_means"]
        held |= upload["counts"] > 0
    rho = cfg.section(FedNHConfig).rho
    want = unit(rho * start + (1 - rho) * unit(total))
    assert held.all()  # every class is held by some client here
    assert torch.allclose(strategy.prototypes, want, atol=1e-6)
    assert not torch.allclose(strategy.prototypes, start, atol=1e-3)
    # FedAvg on the backbone and the scale, weighted by the clients' samples
    examples = [r.content.metric_records["metrics"]["num-examples"] for r in replies]
    scales = [r.content.array_records["arrays"][SCALE_KEY].numpy().item() for r in replies]
    averaged = arrays.to_torch_state_dict()
    assert averaged[SCALE_KEY].item() == pytest.approx(
        sum(s * n for s, n in zip(scales, examples, strict=True)) / sum(examples), rel=1e-6)
    row = strategy.report.row()
    assert row["prototype_classes"] == 10.0
    assert row["fednh_scale"] == averaged[SCALE_KEY].item() != 1.0
    assert row["anchor_movement"] > 0 and row["clients"] == NUM_CLIENTS

    # the server scores the averaged model through the cosine head with the new prototypes
    data = held_out_data(cfg)
    model.load_state_dict(averaged)
    scores = strategy.evaluate_model(model, data, torch.device("cpu"))
    with torch.no_grad():
        logits = averaged[SCALE_KEY] * unit(model.backbone.features(data.x)) @ want.T
    accuracy = (logits.argmax(dim=1) == data.y).double().mean().item()
    assert scores["accuracy"] == pytest.approx(accuracy, abs=1.5 / len(data))
    assert scores["loss"] == pytest.approx(F.cross_entropy(logits, data.y).item(), rel=1e-4)
    strategy.prototypes = start
    assert strategy.evaluate_model(model, data, torch.device("cpu"))["loss"] != scores["loss"]


def with_upload(reply: Message, change) -> RecordDict:
    """The reply's content with its upload's tensors changed by `change` (a dict in place)."""
    tensors = reply.content.array_records[MEANS_RECORD].to_torch_state_dict()
    change(tensors)
    return RecordDict({**reply.content, MEANS_RECORD: tensors_to_record(tensors)})


def test_malformed_uploads_are_rejected(tmp_path):
    cfg = fednh_cfg(tmp_path)
    _, strategy, messages, replies = first_round(cfg)
    reply = replies[0]
    strategy.decode_extra(reply.content)  # as sent: accepted

    def nan(t):
        t["scaled_means"][0, 0] = float("nan")

    def negative(t):
        t["counts"][t["classes"][0]] = -1

    def longer(t):
        t["scaled_means"][1] *= 5.0

    def wide(t):
        t["scaled_means"] = torch.zeros(len(t["classes"]), 129)

    def unheld(t):
        t["counts"][t["classes"][0]] = 0

    for change, message in ((nan, "contains NaN or Inf"), (negative, "negative class counts"),
                            (longer, r"rows of classes \[\d+\] have lengths .* not their counts"),
                            (wide, r"shape \(\d+, 129\), expected \('\*', 128\)"),
                            (unheld, "disagree with the nonzero counts")):
        with pytest.raises(PayloadError, match=message):
            strategy.decode_extra(with_upload(reply, change))
    missing = RecordDict({k: v for k, v in reply.content.items() if k != MEANS_RECORD})
    with pytest.raises(PayloadError, match=f"reply lacks the '{MEANS_RECORD}' record"):
        strategy.decode_extra(missing)

    # in a round: the bad reply is left out with its reason, P moves by the others' only
    bad = Message(with_upload(reply, longer), reply_to=messages[0])
    start = strategy.prototypes.clone()
    strategy.aggregate_train(1, [bad, *replies[1:]])
    row = strategy.report.row()
    assert row["participants"] == [1, 2] and len(row["left_out"]) == 1
    assert "not their counts" in row["left_out"][0]["reason"]
    others = FEDNH.make_strategy(cfg, fednh_model(cfg).state_dict(), 10, 128)
    others.aggregate_train(1, replies[1:])
    assert not torch.equal(strategy.prototypes, start)
    assert torch.equal(strategy.prototypes, others.prototypes)


def test_the_strategy_state_restores_the_prototypes_bit_for_bit(tmp_path):
    cfg = fednh_cfg(tmp_path)
    _, strategy, _, replies = first_round(cfg)
    strategy.aggregate_train(1, replies)
    fresh = FEDNH.make_strategy(cfg, fednh_model(cfg).state_dict(), 10, 128)
    assert not torch.equal(fresh.prototypes, strategy.prototypes)
    fresh.load_state_dict(strategy.state_dict())
    assert torch.equal(fresh.prototypes, strategy.prototypes)
    with pytest.raises(ValueError, match="checkpoint's 'prototypes' is missing or not of shape"):
        fresh.load_state_dict({"prototypes": torch.zeros(10, 3)})


class TrainingGrid(WholeGrid):
    """The federation a ServerApp talks to, in this process: every message goes to the real
    ClientApp handler of its node, whose context state lives as long as the grid."""

    def __init__(self):
        super().__init__(NODES)
        self.contexts = dict(zip(NODES, contexts(), strict=True))

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex  # as a grid sets it
            replies.append(handle_train(message, self.contexts[message.metadata.dst_node_id]))
        return replies


def serve(out: Path, root: Path, rounds: int, resume: bool = False) -> dict:
    """The ServerApp's whole run (`run_experiment`) over a `TrainingGrid`."""
    settings = resolve_run_config(
        {"strategy": "fednh", "config": "conf/mnist-dir0.5.yaml", "num-server-rounds": rounds,
         "out-dir": str(out), "resume": resume,
         "overrides": f"partition.num_partitions={NUM_CLIENTS} train.local_epochs=1 "
                      f"data.root={root}"}, APP_DIR, SECTIONS)
    return run_experiment(TrainingGrid(), settings)


def test_a_resumed_run_replays_the_uninterrupted_one_prototypes_included(tmp_path):
    straight = serve(tmp_path / "straight", tmp_path / "data", rounds=2)
    serve(tmp_path / "resumed", tmp_path / "data", rounds=1)
    after_one = checkpoint(tmp_path / "resumed")["strategy_state"]["prototypes"]
    resumed = serve(tmp_path / "resumed", tmp_path / "data", rounds=2, resume=True)
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")
    final = checkpoint(tmp_path / "straight")["strategy_state"]["prototypes"]
    assert not torch.equal(after_one, final)  # round 2 moved them: the replay is not idle
    assert torch.allclose(final.norm(dim=1), torch.ones(10), atol=1e-6)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    assert straight["final_accuracy"] > straight["initial"]["accuracy"]
