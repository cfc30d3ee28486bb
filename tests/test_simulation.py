"""End to end through Flower's simulation engine: real ServerApp, ClientApps and messages."""

import pytest
import torch
from simulate import NUM_CLIENTS, assert_same_run, checkpoint, simulate

from fedhpro_flwr.algorithms.hyperproto import init_hyperprototypes
from fedhpro_flwr.methods import parse_experiment
from fedhpro_flwr.methods.fedhpro import FedHProConfig

pytestmark = pytest.mark.slow

# 2 rounds of 3 clients, 2 local epochs on MNIST (Dirichlet 0.5): measured 0.631 (chance 0.1,
# the initial model 0.126; FedAvg 0.38 with 2 of 3 clients); rules out a model that stops
# learning or a server that drops the updates (FedHPro's own terms: test_wiring.py)
FINAL_ACCURACY = 0.5


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    results = simulate(out, rounds=2)
    return out, results, checkpoint(out)


def test_results_json_records_every_round(two_rounds):
    _, results, _ = two_rounds
    assert results["strategy"] == "fedhpro"
    assert results["config"]["partition"]["num_partitions"] == NUM_CLIENTS
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert 0.0 <= results["initial"]["accuracy"] <= 0.2  # an untrained 10-class model
    assert results["final_accuracy"] > FINAL_ACCURACY
    for row in results["rounds"]:
        assert row["clients"] == NUM_CLIENTS and row["failures"] == 0
        assert row["client_seconds"] > 0 and row["server_seconds"] > 0
        assert row["wall_seconds"] >= row["server_seconds"]
        # both ways the weights, plus hyper-prototypes down (C x L x d) and per-class
        # statistics up (C x (2d + 1) with the default recalibration from class moments)
        assert row["bytes_down"] > 0 and row["bytes_up"] > 0
        assert row["classes_reported"] == 10
        assert row["hp_match_loss_after"] <= row["hp_match_loss_before"]


def test_hyperprototypes_change_between_rounds(two_rounds):
    _, results, state = two_rounds
    cfg = parse_experiment(results["config"])
    initial = init_hyperprototypes(10, cfg.section(FedHProConfig).num_hyperprototypes,
                                   cfg.model.feature_dim, torch.Generator().manual_seed(cfg.seed))
    hp = state["strategy_state"]["hyperprototypes"]
    assert state["round"] == 2 and hp.shape == initial.shape
    assert not torch.allclose(hp, initial)
    assert all(r["hp_movement"] > 0 for r in results["rounds"])


def test_resume_replays_the_uninterrupted_run_bit_for_bit(two_rounds, tmp_path):
    out, first, _ = two_rounds
    resumed = simulate(out, rounds=3, resume=True)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["rounds"][:2] == first["rounds"]
    assert checkpoint(out)["round"] == 3

    # every client every round; with fraction_train < 1: test_sampling.py
    simulate(tmp_path / "straight", rounds=3)
    assert_same_run(out, tmp_path / "straight")


def test_the_default_experiment_reports_accuracy_per_domain(tmp_path):
    """digits-offline with one client per domain: every round has the four domains' scores."""
    overrides = f"data.root={tmp_path / 'data'} partition.num_partitions=4 train.local_epochs=1"
    results = simulate(tmp_path / "run", rounds=1, config="conf/default.yaml",
                       overrides=overrides, num_clients=4)
    assert results["config"]["data"]["dataset"] == "digits-offline"
    row = results["rounds"][0]
    domains = ("mnist", "uci", "synth", "mnistm")
    test_sizes = (500, 359, 500, 500)  # 20% of each domain's (domain, class) strata
    for domain, size in zip(domains, test_sizes, strict=True):  # a share of that domain's set
        correct = row[f"accuracy_{domain}"] * size
        assert correct == pytest.approx(round(correct), abs=1e-6), domain
    overall = sum(row[f"accuracy_{d}"] * n for d, n in zip(domains, test_sizes, strict=True))
    assert row["accuracy"] == pytest.approx(overall / sum(test_sizes), abs=1e-9)
