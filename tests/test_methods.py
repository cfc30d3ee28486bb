"""Each peer method's defining rule, on small tensors with hand-computed answers."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedProx
from replies import LIVE, grid_with_nodes, trained
from torch import nn

from fedhpro_flwr.algorithms.finch import finch, linked_components
from fedhpro_flwr.algorithms.losses import fpl_loss, prototype_mse, proximal_term
from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.prototypes import nearest_prototype_accuracy, weighted_class_mean
from fedhpro_flwr.algorithms.tgp import (
    PrototypeGenerator,
    class_gap_margin,
    generator_loss,
    train_generator,
)
from fedhpro_flwr.data.federated import TensorData
from fedhpro_flwr.methods import METHODS, get_method, parse_experiment
from fedhpro_flwr.methods.fedprox import MU_KEY, FedProxStrategy
from fedhpro_flwr.methods.payload import encode_class_rows, tensors_to_record
from fedhpro_flwr.methods.prototype import LOCAL_RECORD
from fedhpro_flwr.methods.strategy import TrainingDiverged


def test_registry_holds_every_strategy_and_names_them_on_a_typo():
    assert set(METHODS) >= {"fedhpro", "fedavg", "fedprox", "fedproto", "fedtgp", "fpl", "creff"}
    assert all(name == method.name for name, method in METHODS.items())
    with pytest.raises(ValueError, match="unknown strategy 'fedprot'; available: creff, fedavg"):
        get_method("fedprot")


# ---- FedProx ------------------------------------------------------------------------------

def test_proximal_term_and_its_gradient():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[3.0]], requires_grad=True)
    term = proximal_term([w, b], [torch.zeros(2), torch.tensor([[1.0]])], mu=0.5)
    assert term.item() == pytest.approx(0.25 * (1 + 4 + 4))
    term.backward()
    assert torch.allclose(w.grad, torch.tensor([0.5, 1.0]))  # mu * (w - w_global)
    assert torch.allclose(b.grad, torch.tensor([[1.0]]))


class NodeList:
    """A grid with three connected nodes (all that configure_train asks of it)."""

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13]


@pytest.mark.usefixtures("serverapp_identity")
def test_fedprox_sends_what_flowers_fedprox_sends_with_the_configured_mu():
    cfg = parse_experiment({"fedprox": {"mu": 0.3}})
    arrays = ArrayRecord({"w": Array(np.zeros(1, np.float32))})
    ours = FedProxStrategy(cfg, {"w": torch.zeros(1)}).configure_train(
        1, arrays, ConfigRecord({"lr": 0.1}), NodeList())
    flowers = FedProx(proximal_mu=0.3).configure_train(1, arrays, ConfigRecord({"lr": 0.1}),
                                                        NodeList())
    sent = {m.metadata.dst_node_id: dict(m.content["config"]) for m in ours}
    assert sent == {m.metadata.dst_node_id: dict(m.content["config"]) for m in flowers}
    assert all(config[MU_KEY] == 0.3 for config in sent.values())


# ---- FedProto -----------------------------------------------------------------------------

def test_fedproto_averages_by_counts_over_the_clients_holding_each_class():
    protos = torch.tensor([
        [[1.0, 0.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0]],  # client A holds classes 0, 1
        [[0.0, 0.0], [6.0, 2.0], [4.0, 4.0], [0.0, 0.0]],  # client B holds classes 1, 2
    ])
    counts = torch.tensor([[5, 3, 0, 0], [0, 1, 2, 0]])
    mean, present = weighted_class_mean(protos, counts)
    assert present.tolist() == [True, True, True, False]
    assert torch.allclose(mean[0], torch.tensor([1.0, 0.0]))  # B's zero row is masked out
    assert torch.allclose(mean[1], torch.tensor([(3 * 2 + 6) / 4, 2.0]))  # 3:1 by counts
    assert torch.allclose(mean[2], torch.tensor([4.0, 4.0]))
    assert torch.equal(mean[3], torch.zeros(2))


def test_prototype_mse_skips_classes_without_a_global_prototype():
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    protos = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    loss = prototype_mse(z, torch.tensor([0, 1]), protos, torch.tensor([True, False]))
    assert loss.item() == pytest.approx((1 + 4) / 4)  # mean over all B x d entries


class Identity(Backbone):
    """A backbone whose features are its inputs: nearest-prototype rules become visible."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.feature_dim = dim
        self.classifier = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_nearest_prototype_accuracy_only_predicts_classes_with_a_prototype():
    x = torch.tensor([[0.1, 0.0], [0.9, 1.0], [5.0, 5.0], [1.2, 0.8]])
    data = TensorData(x, torch.tensor([0, 1, 2, 1]), num_classes=3)
    protos = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    device = torch.device("cpu")
    model = Identity(2, 3)
    all_present = torch.tensor([True, True, True])
    assert nearest_prototype_accuracy(model, data, protos, all_present, device) == 1.0
    # without class 2's prototype its sample goes to the nearest remaining class (1): wrong
    no_two = torch.tensor([True, True, False])
    assert nearest_prototype_accuracy(model, data, protos, no_two, device) == 0.75
    assert nearest_prototype_accuracy(model, data, protos, torch.zeros(3, dtype=torch.bool),
                                      device) == 0.0


# ---- FedTGP -------------------------------------------------------------------------------

def test_fedtgp_margin_is_the_largest_class_gap_capped_by_the_threshold():
    means = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 10.0], [100.0, 100.0]])
    present = torch.tensor([True, True, True, False])  # the far-away class 3 is absent
    # gaps: class 0 -> 3, class 1 -> 3, class 2 -> 10 (its nearest is class 0)
    assert class_gap_margin(means, present, threshold=100.0) == pytest.approx(10.0)
    assert class_gap_margin(means, present, threshold=5.0) == 5.0
    assert class_gap_margin(means, torch.tensor([True, False, False, False]), 7.0) == 7.0


def test_fedtgp_generator_loss_adds_the_margin_to_the_own_class_distance():
    generated = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    loss = generator_loss(generated, torch.tensor([[0.0, 0.0]]), torch.tensor([0]), margin=1.0)
    assert loss.item() == pytest.approx(math.log(2))  # distances 0 + 1 and 1: a tie


def test_fedtgp_generator_training_lowers_its_loss_and_separates_classes():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=g) * 3
    labels = torch.arange(4).repeat(5)
    protos = centres[labels] + 0.3 * torch.randn(20, 6, generator=g)
    torch.manual_seed(0)
    model = PrototypeGenerator(4, 6, 6)
    margin = class_gap_margin(centres, torch.ones(4, dtype=torch.bool), 100.0)
    before, after = train_generator(model, protos, labels, margin, epochs=300, lr=0.05,
                                    batch_size=8, generator=g)
    assert after < 0.7 * before
    with torch.no_grad():
        nearest = torch.cdist(protos, model()).argmin(dim=1)
    assert torch.equal(nearest, labels)


# ---- FPL: FINCH and its loss ----------------------------------------------------------------

def test_finch_links_first_neighbours_and_shared_neighbours():
    # 0 -> 2, 1 -> 2, 2 -> 1 form one cluster; 3 <-> 4 another
    assert linked_components(torch.tensor([2, 2, 1, 4, 3])).tolist() == [0, 0, 0, 1, 1]


def angles(*degrees: float) -> torch.Tensor:
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([torch.cos(rad), torch.sin(rad)], dim=1)


def test_finch_merges_pairs_then_groups_and_stops_before_one_cluster():
    points = angles(0, 1, 10, 11, 90, 91, 100, 101)
    partitions = finch(points)
    assert [p.tolist() for p in partitions] == [
        [0, 0, 1, 1, 2, 2, 3, 3],  # first neighbours: the pairs
        [0, 0, 0, 0, 1, 1, 1, 1],  # pairs' means: the two groups
    ]  # the next level (one cluster) is not a partition


def test_finch_keeps_one_cluster_when_all_points_agree():
    assert [p.tolist() for p in finch(angles(0, 1, 2))] == [[0, 0, 0]]
    assert [p.tolist() for p in finch(angles(5))] == [[0]]


def test_fpl_loss_against_a_hand_computed_value():
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 2])  # class 2 has no global prototype: adds 0, counts in the mean
    clusters = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    unbiased = torch.tensor([[0.5, 0.0], [0.0, 1.0], [0.0, 0.0]])
    present = torch.tensor([True, True, False])
    tau = 0.5
    cos = torch.tensor([1.0, 1 / math.sqrt(2), 0.0]) / tau
    infonce = torch.logsumexp(cos, 0) - torch.logsumexp(cos[:2], 0)  # two positives
    mse = (0.5**2 + 0.0) / 2
    expected = (infonce.item() + mse) / 2
    loss = fpl_loss(z, y, clusters, labels, unbiased, present, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_fpl_loss_is_zero_without_global_prototypes():
    z = torch.randn(3, 2, requires_grad=True)
    loss = fpl_loss(z, torch.tensor([0, 1, 1]), torch.zeros(0, 2),
                    torch.zeros(0, dtype=torch.long), torch.zeros(2, 2),
                    torch.zeros(2, dtype=torch.bool), 0.02)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph


@pytest.mark.usefixtures("serverapp_identity")
def test_fedtgp_ends_the_run_before_an_exploded_generator_reaches_the_clients():
    """Finite replies can still blow the server's generator up (the comparison's digits-offline
    FedTGP seed 2, round 45): the round is refused as diverged, nothing NaN is kept to send."""
    cfg = parse_experiment({"federation": {"min_train_nodes": 3, "round_timeout": 30},
                            "fedtgp": {"server_epochs": 5}})
    state = {"w": torch.zeros(3)}
    strategy = get_method("fedtgp").make_strategy(cfg, state, 2, 2)
    grid, _ = grid_with_nodes([LIVE] * 3)
    messages = list(strategy.configure_train(1, tensors_to_record(state), ConfigRecord(), grid))
    grid.push_messages(messages)
    counts = torch.tensor([10, 10])

    def prototypes(scale: float) -> dict:
        rows = {"prototypes": torch.eye(2) * scale}
        return {LOCAL_RECORD: encode_class_rows(counts > 0, rows, counts)}

    sane = [trained(m, i, torch.zeros(3), prototypes(1.0)) for i, m in enumerate(messages)]
    strategy.aggregate_train(1, sane)
    assert torch.isfinite(strategy.prototypes).all()
    exploded = [trained(m, i, torch.zeros(3), prototypes(3e37)) for i, m in enumerate(messages)]
    with pytest.raises(TrainingDiverged, match=r"round 1: the server step over 3 usable "
                                               r"replies gave NaN or Inf in the global anchors"):
        strategy.aggregate_train(1, exploded)
