"""Each method's distinctive part reaches training: a client update compared with one built by
hand from the paper's formulas, and the server's weighting through the real `aggregate_train`.

The loss functions are checked on their own in test_losses.py; these tests fail when a part is
computed but left out of the update (a dropped term, an ignored config key, equal weights).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from test_method_round import CFG, NUM_CLIENTS, training_message

from fedhpro_flwr.algorithms.extraction import extract_class_statistics
from fedhpro_flwr.algorithms.models import Backbone, build_model
from fedhpro_flwr.data.federated import TensorData, client_data, dataset_spec
from fedhpro_flwr.methods import ClientTask, get_method, parse_experiment
from fedhpro_flwr.methods.fedhpro import HP_RECORD, FedHProConfig
from fedhpro_flwr.methods.fedprox import MU_KEY
from fedhpro_flwr.methods.fpl import CLUSTER_RECORD
from fedhpro_flwr.methods.payload import encode_class_rows, tensors_to_record
from fedhpro_flwr.methods.prototype import GLOBAL_RECORD
from fedhpro_flwr.methods.strategy import TooFewReplies, TrainingDiverged

SAMPLES = 48  # one batch: one SGD step per local epoch, so the update is one gradient
SEED = 11


def small_data(cfg=CFG) -> TensorData:
    """A client's first SAMPLES training samples (several classes)."""
    data = client_data(cfg, 0)
    return data.subset(torch.arange(SAMPLES).numpy())


def one_step_cfg(**sections):
    """CFG with a single full-batch SGD step per client and the given method sections."""
    return parse_experiment({**CFG.to_dict(), "train": {"local_epochs": 1, "batch_size": SAMPLES,
                                                        "lr": 0.1}, **sections})


def initial_model(cfg) -> Backbone:
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, dataset_spec(cfg))


def client_update(name: str, cfg, records: dict[str, ArrayRecord],
                  config: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the method's client trainer once from `initial_model`: (trained weights, metrics)."""
    model = initial_model(cfg)
    content = RecordDict({"config": ConfigRecord(config or {}), **records})
    task = ClientTask(model, small_data(cfg), content, cfg, torch.device("cpu"),
                      torch.Generator().manual_seed(SEED))
    _, metrics = get_method(name).client_train(task)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ---- FedHPro's client: CE + w_cl * HPCL (with the margin) + w_al * HPAL ---------------------

def hyperprototypes(cfg) -> torch.Tensor:
    hp_cfg = cfg.section(FedHProConfig)
    return torch.randn(10, hp_cfg.num_hyperprototypes, initial_model(cfg).feature_dim,
                       generator=torch.Generator().manual_seed(3))


def hand_built_fedhpro_step(cfg, hp: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
    """FedHPro's client round written out from FEDHPRO.md: (weights after the step, m_k)."""
    hp_cfg, data = cfg.section(FedHProConfig), small_data(cfg)
    model = initial_model(cfg)
    generator = torch.Generator().manual_seed(SEED)
    # extraction comes first and draws from the client's generator; its class means seed m_k
    stats = extract_class_statistics(copy.deepcopy(model), data, hp_cfg.batch_real,
                                     hp_cfg.repeat_num, generator, torch.device("cpu"))
    means = stats.feature_means
    order = torch.randperm(len(data), generator=generator)
    x, y = data.x[order], data.y[order]
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    z = model.features(x)
    ce = F.cross_entropy(model.classifier(z), y)

    # the running class means after this batch: EMA for classes seen before, else the batch mean
    in_batch = torch.bincount(y, minlength=10) > 0
    for c in range(10):
        if in_batch[c]:
            batch_mean = z[y == c].detach().mean(dim=0)
            keep = hp_cfg.margin_momentum if stats.present[c] else 0.0
            means[c] = keep * means[c] + (1 - keep) * batch_mean
    held = means[stats.present | in_batch]
    pairs = sum(held[i] @ held[j] for i in range(len(held)) for j in range(len(held)) if i != j)
    margin = max(float(pairs) / 81, 0.0) if hp_cfg.margin else 0.0

    zh = F.normalize(z, dim=1)
    anchors = torch.stack([F.normalize(hp[c], dim=1).mean(dim=0) for c in range(10)])
    similarity = torch.exp(zh @ anchors.T / hp_cfg.tau)
    hpcl = -torch.log(similarity[torch.arange(len(y)), y] / (similarity.sum(dim=1) + margin))
    centers = F.normalize(hp.mean(dim=1), dim=1)
    hpal = F.smooth_l1_loss(zh, centers[y])
    loss = ce + hp_cfg.w_cl * hpcl.mean() + hp_cfg.w_al * hpal
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, margin


# (w_cl, w_al, margin): the paper's loss, each part alone, and none of them
VARIANTS = [(1.0, 1.0, True), (2.0, 0.0, True), (1.0, 0.0, False), (0.0, 3.0, False),
            (0.0, 0.0, False)]


@pytest.mark.parametrize(("w_cl", "w_al", "margin"), VARIANTS)
def test_fedhpro_client_step_is_ce_plus_hpcl_with_margin_plus_hpal(w_cl, w_al, margin):
    cfg = one_step_cfg(fedhpro={"w_cl": w_cl, "w_al": w_al, "margin": margin})
    hp = hyperprototypes(cfg)
    trained, metrics = client_update("fedhpro", cfg, {HP_RECORD: tensors_to_record({"hp": hp})})
    expected, m_k = hand_built_fedhpro_step(cfg, hp)
    assert max_difference(trained, expected) < 1e-6
    assert metrics["margin"] == pytest.approx(m_k, rel=1e-5)  # 0 when switched off


def test_each_part_of_fedhpros_loss_moves_the_step_far_beyond_the_tolerance():
    """What makes the test above discriminating: leaving out HPCL, HPAL or the margin changes
    the step by many times its 1e-6 tolerance (measured: 0.13, 1.2e-4 and 8.3e-5; the margin
    of the untrained model is small, m_k = 0.023, against sum_c exp(cos / tau))."""
    full = one_step_cfg()
    hp = hyperprototypes(full)
    reference, m_k = hand_built_fedhpro_step(full, hp)
    assert m_k > 0.01
    for part in ({"w_cl": 0.0}, {"w_al": 0.0}, {"margin": False}):
        without, _ = hand_built_fedhpro_step(one_step_cfg(fedhpro=part), hp)
        assert max_difference(reference, without) > 4e-5, part


# ---- the peers' client terms ----------------------------------------------------------------

def prototype_records(cfg, name: str, sent: bool) -> dict[str, ArrayRecord]:
    """Global prototypes for every class (and FPL's two clusters per class) as a server sends
    them after a round, or none at all (`sent` False: round 1)."""
    dim = initial_model(cfg).feature_dim
    protos = torch.rand(10, dim, generator=torch.Generator().manual_seed(5))
    present = torch.full((10,), sent)
    records = {GLOBAL_RECORD: encode_class_rows(present, {"prototypes": protos})}
    if name == "fpl":
        clusters, labels = torch.cat([protos, protos + 0.1]), torch.arange(10).repeat(2)
        records[CLUSTER_RECORD] = tensors_to_record(
            {"prototypes": clusters[present[labels]], "labels": labels[present[labels]]})
    return records


def peer_update(name: str, on: bool, epochs: int = 1) -> dict[str, torch.Tensor]:
    """The peer's client update with its term on, or off: weighted 0 or, for FPL, which has no
    weight, without global prototypes."""
    cfg = one_step_cfg(train={"local_epochs": epochs, "batch_size": SAMPLES, "lr": 0.1},
                       fedproto={"lam": 1.0 if on else 0.0}, fedtgp={"lam": 10.0 if on else 0.0})
    if name == "fedprox":
        return client_update(name, cfg, {}, {MU_KEY: 5.0 if on else 0.0})[0]
    return client_update(name, cfg, prototype_records(cfg, name, sent=on or name != "fpl"))[0]


@pytest.mark.parametrize("name", ["fedprox", "fedproto", "fedtgp", "fpl"])
def test_each_peers_term_changes_its_update_and_off_it_is_fedavgs(name):
    two_steps = one_step_cfg(train={"local_epochs": 2, "batch_size": SAMPLES, "lr": 0.1})
    fedavg = client_update("fedavg", two_steps, {})[0]
    off, on = peer_update(name, on=False, epochs=2), peer_update(name, on=True, epochs=2)
    assert max_difference(off, fedavg) == 0.0  # the same CE step, bit for bit
    assert max_difference(on, fedavg) > 1e-4


def test_fedprox_pulls_the_update_towards_the_global_weights():
    start = initial_model(one_step_cfg()).state_dict()

    def moved(weights: dict[str, torch.Tensor]) -> float:
        return sum(float((weights[n] - v).norm() ** 2) for n, v in start.items()
                   if v.is_floating_point())

    # the proximal gradient mu (w - w_global) is zero at the first step: it acts from the second
    assert max_difference(peer_update("fedprox", True), peer_update("fedprox", False)) == 0.0
    ce, prox = peer_update("fedprox", False, epochs=3), peer_update("fedprox", True, epochs=3)
    assert moved(prox) < 0.9 * moved(ce)


# ---- the server: FedAvg weighted by example counts, bad replies left out -------------------

EXAMPLES, LOSSES = [1, 2, 7], [3.0, 1.0, 0.5]


def reply_content(weights: dict[str, torch.Tensor], partition: int) -> RecordDict:
    metrics = MetricRecord({"num-examples": EXAMPLES[partition], "partition-id": partition,
                            "client-seconds": 1.0, "train_loss": LOSSES[partition]})
    return RecordDict({"arrays": tensors_to_record(weights), "metrics": metrics})


def fedavg_round(*changes):
    """One FedAvg aggregation of three replies whose weights are all p + 1 (client p), reply
    i changed by `changes[i]` (None: left as it is): (strategy, aggregated weights, metrics)."""
    model = initial_model(CFG)
    strategy = get_method("fedavg").make_strategy(CFG, model.state_dict(), 10, model.feature_dim)
    messages = [training_message("fedavg", strategy, tensors_to_record(model.state_dict()),
                                 100 + p) for p in range(NUM_CLIENTS)]
    strategy._sampled = [m.metadata.dst_node_id for m in messages]
    contents = [reply_content({k: torch.full_like(v, p + 1) if v.is_floating_point() else v
                               for k, v in model.state_dict().items()}, p)
                for p in range(NUM_CLIENTS)]
    for content, change in zip(contents, changes, strict=False):
        if change is not None:
            change(content)
    replies = [Message(c, reply_to=m) for c, m in zip(contents, messages, strict=True)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    return strategy, arrays.to_torch_state_dict(), metrics


def assert_all_weights(weights: dict[str, torch.Tensor], value: float) -> None:
    for name, tensor in weights.items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor, torch.full_like(tensor, value)), name


@pytest.mark.usefixtures("serverapp_identity")
def test_fedavg_weights_each_reply_by_its_number_of_examples():
    strategy, weights, metrics = fedavg_round()
    assert_all_weights(weights, (1 * 1 + 2 * 2 + 3 * 7) / 10)  # 2.6; unweighted: 2.0
    assert metrics["train_loss"] == pytest.approx((3.0 + 2.0 + 3.5) / 10)
    assert strategy.report.train_loss == metrics["train_loss"]
    assert "train_ce" not in strategy.report.row()  # no client reported it


@pytest.mark.usefixtures("serverapp_identity")
def test_the_ce_share_of_the_training_loss_is_kept_when_every_client_reports_it():
    strategy, _, _ = fedavg_round(*(set_metric("train_ce", loss / 2) for loss in LOSSES))
    assert strategy.report.row()["train_ce"] == pytest.approx((3.0 + 2.0 + 3.5) / 20)


def set_metric(key: str, value: float):
    def change(content: RecordDict) -> None:
        content.metric_records["metrics"][key] = value
    return change


def drop(record: str, key: str | None = None):
    def change(content: RecordDict) -> None:
        if key is None:
            del content[record]
        else:
            del content.metric_records[record][key]
    return change


def misshape(content: RecordDict) -> None:
    weights = content.array_records["arrays"].to_torch_state_dict()
    weights["classifier.bias"] = torch.zeros(3)
    content["arrays"] = tensors_to_record(weights)


BROKEN = {
    "no weights": (drop("arrays"), "reply lacks the 'arrays' or 'metrics' record"),
    "no metrics": (drop("metrics"), "reply lacks the 'arrays' or 'metrics' record"),
    "no train_loss": (drop("metrics", "train_loss"),
                      "metric 'train_loss' is missing or not a finite number: None"),
    "NaN loss": (set_metric("train_loss", float("nan")),
                 "metric 'train_loss' is missing or not a finite number: nan"),
    "infinite count": (set_metric("num-examples", float("inf")),
                       "metric 'num-examples' is missing or not a finite number: inf"),
    "no examples": (set_metric("num-examples", 0), "num-examples must be positive, got 0"),
    "wrong shape": (misshape, "model weights"),
}


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_bad_reply_is_left_out_with_its_reason_and_the_rest_averaged(case):
    change, reason = BROKEN[case]
    strategy, weights, metrics = fedavg_round(change)
    report = strategy.report
    assert report.participants == [1, 2] and metrics["clients"] == 2
    assert [entry["node"] for entry in report.left_out] == [100]
    assert report.left_out[0]["reason"].startswith(f"invalid reply, rejected: {reason}")
    assert_all_weights(weights, (2 * 2 + 3 * 7) / 9)  # clients 1 and 2 only


def nan_weights(content: RecordDict) -> None:
    weights = content.array_records["arrays"].to_torch_state_dict()
    weights["classifier.bias"][0] = float("nan")
    content["arrays"] = tensors_to_record(weights)


@pytest.mark.usefixtures("serverapp_identity")
def test_a_round_in_which_every_reply_is_non_finite_has_diverged():
    nan_loss = set_metric("train_loss", float("nan"))
    for changes in ([nan_loss] * NUM_CLIENTS, [nan_weights, nan_loss, nan_weights]):
        with pytest.raises(TrainingDiverged, match="training diverged: every reply is non-"
                           "finite; round 1: 0 usable replies") as stopped:
            fedavg_round(*changes)
        assert stopped.value.round == 1
    # a reply missing, malformed or late is a fault of the federation, not a divergence
    for odd in (drop("metrics", "train_loss"), misshape):
        with pytest.raises(TooFewReplies, match="round 1: 0 usable") as stopped:
            fedavg_round(nan_loss, odd, nan_loss)
        assert not isinstance(stopped.value, TrainingDiverged)
