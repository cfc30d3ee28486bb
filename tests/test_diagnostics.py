"""The anchor diagnostics: their arithmetic, and what a real simulation records."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from simulate import NUM_CLIENTS, OVERRIDES, checkpoint, simulate

from fedhpro_flwr.algorithms.diagnostics import (
    anchor_cosines,
    consistency,
    consistency_metric,
    embedding_2d,
    relative_change,
    spread,
)
from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.config import ConfigError, ExperimentConfig
from fedhpro_flwr.data.federated import dataset_spec
from fedhpro_flwr.methods import get_method, parse_experiment


def test_anchor_cosines_over_present_classes_only():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    present = torch.tensor([True, True, True, False])
    out = anchor_cosines(anchors, present)
    half = math.sqrt(0.5)
    assert out["anchor_cosine_mean"] == pytest.approx((0.0 + half + half) / 3)
    assert out["anchor_cosine_max"] == pytest.approx(half)
    assert anchor_cosines(anchors, torch.tensor([True, False, False, False])) == {}


def test_relative_change_and_spread():
    before = torch.tensor([[3.0, 4.0], [100.0, 0.0]])
    after = torch.tensor([[3.0, 5.0], [0.0, 0.0]])
    assert relative_change(before, after, torch.tensor([True, False])) == pytest.approx(0.2)
    assert spread([0.2, 0.4, 0.9], "c") == pytest.approx(
        {"c_mean": 0.5, "c_std": torch.tensor([0.2, 0.4, 0.9]).std(correction=0).item(),
         "c_min": 0.2})
    assert spread([], "c") == {}


def test_consistency_uses_the_classes_both_sides_have():
    local = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    anchors = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    local_present = torch.tensor([True, True, True])
    anchor_present = torch.tensor([True, True, False])
    assert consistency(local, local_present, anchors, anchor_present) == pytest.approx(0.5)
    none = torch.zeros(3, dtype=torch.bool)
    assert consistency(local, local_present, anchors, none) is None
    assert consistency_metric(local, local_present, anchors, none) == {}


def test_embedding_projects_features_and_anchors_together():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    labels = torch.arange(3).repeat_interleave(20)
    features = centres[labels] + torch.randn(60, 16, generator=g)
    picture = embedding_2d(features, labels, centres, torch.tensor([True, False, True]))
    assert len(picture["features"]) == 60 and len(picture["anchors"]) == 2
    assert picture["anchor_classes"] == [0, 2] and picture["labels"] == labels.tolist()
    assert 0.0 < picture["explained_variance"] <= 1.0
    # the 2-D picture keeps the classes apart: each class's mean is nearest its own anchor
    points = torch.tensor(picture["features"])
    for row, c in enumerate(picture["anchor_classes"]):
        means = torch.stack([points[labels == k].mean(0) for k in range(3)])
        anchor = torch.tensor(picture["anchors"][row])
        assert (means - anchor).norm(dim=1).argmin().item() == c


def test_embedding_rounds_are_read_from_commas_or_a_number():
    assert ExperimentConfig.from_flat({"diagnostics.embedding_rounds": "1,10"}
                                      ).diagnostics.rounds() == (1, 10)
    assert ExperimentConfig.from_flat({"diagnostics.embedding_rounds": 3}
                                      ).diagnostics.rounds() == (3,)
    with pytest.raises(ConfigError, match=r"diagnostics\.embedding_rounds"):
        ExperimentConfig.from_flat({"diagnostics.embedding_rounds": "1,x"})


DIAGNOSED = OVERRIDES + " diagnostics.consistency=true diagnostics.embedding_rounds=2"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedhpro", "fedproto"])
def test_a_simulation_records_the_anchor_diagnostics(tmp_path, strategy):
    results = simulate(tmp_path, rounds=2, strategy=strategy, overrides=DIAGNOSED)
    first, second = results["rounds"]
    for row in (second,) if strategy == "fedproto" else (first, second):
        # FedProto has no global prototypes before round 1's uploads: nothing to compare
        assert row["consistency_min"] <= row["consistency_mean"]
        # Samuelson: no client lies further below the mean than sqrt(n - 1) std
        spread_bound = row["consistency_std"] * math.sqrt(NUM_CLIENTS - 1)
        assert row["consistency_mean"] - row["consistency_min"] <= spread_bound + 1e-9
        assert row["anchor_movement"] > 0.0
    # the separation recorded is that of the anchors the run ended with (its checkpoint)
    cfg = parse_experiment(results["config"])
    model = build_model(cfg.model, dataset_spec(cfg))
    ended = get_method(strategy).make_strategy(cfg, model.state_dict(), 10, model.feature_dim)
    ended.load_state_dict(checkpoint(tmp_path)["strategy_state"])
    expected = anchor_cosines(*ended.global_anchors())
    assert second["anchor_cosine_mean"] == pytest.approx(expected["anchor_cosine_mean"])
    assert second["anchor_cosine_max"] == pytest.approx(expected["anchor_cosine_max"])
    assert first["anchor_cosine_mean"] != second["anchor_cosine_mean"]  # round 2 moved them
    picture = json.loads((tmp_path / "embedding-round2.json").read_text())
    assert picture["round"] == 2 and picture["strategy"] == strategy
    assert len(picture["features"]) == len(picture["labels"]) == 10 * 50
    assert picture["anchor_classes"] == list(range(10))
    assert not (tmp_path / "embedding-round1.json").exists()
    if strategy == "fedhpro":
        # the recalibrated classifier is evaluated, and so is the FedAvg'd one it replaced
        # (a different classifier: the two accuracies differ in some round)
        assert any(r["aggregated_head_accuracy"] != r["accuracy"] for r in results["rounds"])
        # diagnostics only measure: the same run without them trains identically
        plain = simulate(tmp_path / "plain", rounds=2, strategy=strategy)
        accuracies = [r["accuracy"] for r in results["rounds"]]
        assert [r["accuracy"] for r in plain["rounds"]] == accuracies
        assert "consistency_mean" not in plain["rounds"][0]
        assert first["clients"] == NUM_CLIENTS


def test_consistency_is_the_cosine_of_each_clients_prototypes_with_the_anchors():
    # the client's number, recomputed by hand for one client and two classes
    local = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    anchors = F.normalize(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    present = torch.tensor([True, False, True])
    expected = (F.cosine_similarity(local[0], anchors[0], dim=0)
                + F.cosine_similarity(local[2], anchors[2], dim=0)) / 2
    value = consistency(local, present, anchors, torch.ones(3, dtype=torch.bool))
    assert value == pytest.approx(expected.item())
