"""Robust pooling (`algorithms.robust`): the median and trimmed mean on hand-made replies with
an outlier, Flower's and numpy's arithmetic, per-class pooling over the holders only, and the
rule as the strategies apply it (`federation.aggregation`)."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from replies import LIVE, grid_with_nodes, trained
from simulate import OVERRIDES, simulate

from fedhpro_flwr.algorithms.extraction import ClassStatistics
from fedhpro_flwr.algorithms.recalibration import mean_class_gradients, pooled_moments
from fedhpro_flwr.algorithms.robust import Pooling, pool, pool_classes, pool_states
from fedhpro_flwr.config import ConfigError
from fedhpro_flwr.methods import get_method, parse_experiment
from fedhpro_flwr.methods.payload import ClassRows, tensors_to_record
from fedhpro_flwr.methods.strategy import ClientReply, ExperimentStrategy


def test_one_outlier_of_five_moves_the_mean_but_neither_robust_rule():
    honest = torch.tensor([[1.0, -2.0], [1.2, -2.2], [0.8, -1.8], [1.1, -2.1]])
    liar = torch.tensor([[1000.0, 1000.0]])
    replies = torch.cat([honest, liar])
    assert replies.mean(0)[0] > 200  # the plain average follows the liar
    assert torch.allclose(pool(replies, "median"), torch.tensor([1.1, -2.0]))
    # 5 values, trim 0.2: one dropped at each end of each coordinate, (1.0, 1.1, 1.2) and
    # (-2.1, -2.0, -1.8) are left
    assert torch.allclose(pool(replies, "trimmed-mean", 0.2),
                          torch.tensor([3.3 / 3, -5.9 / 3]))


def test_an_even_count_takes_the_middle_two_and_trim_zero_is_the_mean():
    values = torch.tensor([[4.0], [1.0], [3.0], [2.0]])
    assert pool(values, "median").item() == 2.5
    assert pool(values, "trimmed-mean", 0.0).item() == 2.5
    assert pool(values, "trimmed-mean", 0.25).item() == 2.5  # drops 1 and 4
    assert pool(values, "trimmed-mean", 0.49).item() == 2.5  # int(0.49 * 4) = 1 a side


def test_the_arithmetic_is_flowers_and_numpys():
    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 10):
        values = torch.randn(n, 3, 4, generator=generator, dtype=torch.float64)
        assert np.allclose(pool(values, "median").numpy(), np.median(values.numpy(), axis=0))
        for trim in (0.0, 0.1, 0.3):
            assert np.allclose(pool(values, "trimmed-mean", trim).numpy(),
                               trim_mean(values.numpy(), trim))


def test_bad_rules_and_fractions_are_refused():
    with pytest.raises(ValueError, match=r"trim fraction 0\.5"):
        pool(torch.zeros(3, 2), "trimmed-mean", 0.5)
    with pytest.raises(ValueError, match="unknown robust rule 'mean'"):
        pool(torch.zeros(3, 2), "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no values"):
        pool(torch.zeros(0, 2), "median")


def test_states_keep_their_dtypes_and_integer_buffers_stay_integers():
    states = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)},
              {"w": torch.tensor([2.0, 9.0]), "n": torch.tensor(4)},
              {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(100)}]
    pooled = pool_states(states, "median")
    assert pooled["w"].tolist() == [2.0, 4.0] and pooled["w"].dtype == torch.float32
    assert pooled["n"].item() == 4 and pooled["n"].dtype == torch.int64


def test_a_class_is_pooled_over_the_clients_holding_it_only():
    # 3 clients, 3 classes, d = 1. Class 0: all three hold it, one lies (50). Class 1: only
    # clients 0 and 1 (client 2's row is zeros, not a vote). Class 2: nobody.
    values = torch.tensor([[[1.0], [4.0], [0.0]],
                           [[2.0], [6.0], [0.0]],
                           [[50.0], [0.0], [0.0]]])
    present = torch.tensor([[True, True, False], [True, True, False], [True, False, False]])
    pooled, holders = pool_classes(values, present, "median")
    assert pooled.flatten().tolist() == [2.0, 5.0, 0.0]
    assert holders.tolist() == [3, 2, 0]
    trimmed, _ = pool_classes(values, present, "trimmed-mean", 0.34)  # int(0.34 * 3) = 1
    assert trimmed.flatten().tolist() == [2.0, 5.0, 0.0]  # class 1: int(0.68) = 0, the mean


# ---- wired into the strategies: one liar among the replies ---------------------------------

LIAR = 1000.0


def robust_cfg(rule: str, **federation):
    return parse_experiment({"federation": {"aggregation": rule, "trim_fraction": 0.2,
                                            **federation}})


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize(("rule", "expected"), [
    ("mean", (1.0 + 1.2 + 0.8 + 1.1 + LIAR) / 5),  # every reply holds 10 examples
    ("median", 1.1),
    ("trimmed-mean", (1.0 + 1.1 + 1.2) / 3),  # 0.8 and the liar cut
])
def test_a_round_pools_the_weights_by_the_rule_configured(rule, expected):
    """Through Flower's in-memory grid: the strategy sends, five nodes answer, one lies."""
    state = {"w": torch.zeros(3)}
    strategy = ExperimentStrategy(robust_cfg(rule, min_train_nodes=5, round_timeout=30), state)
    grid, _ = grid_with_nodes([LIVE] * 5)
    messages = list(strategy.configure_train(1, tensors_to_record(state), ConfigRecord(), grid))
    grid.push_messages(messages)
    values = (1.0, 1.2, 0.8, 1.1, LIAR)
    replies = [trained(m, i, torch.full((3,), v)) for i, (m, v) in
               enumerate(zip(messages, values, strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((3,), expected))


def prototype_replies() -> list[ClientReply]:
    """Three clients, two classes, d = 2; the third lies about class 0 and claims a huge count
    (under a count-weighted rule it would own the class)."""
    def reply(pid: int, protos: list[list[float]], counts: list[int]) -> ClientReply:
        counts_t = torch.tensor(counts)
        rows = ClassRows(counts_t > 0, {"prototypes": torch.tensor(protos)}, counts_t)
        return ClientReply(100 + pid, pid, int(counts_t.sum()), {}, {"fedsa_gap": 1.0}, rows)

    return [reply(0, [[1.0, 0.0], [0.0, 1.0]], [10, 10]),
            reply(1, [[0.8, 0.2], [0.2, 0.8]], [10, 10]),
            reply(2, [[LIAR, -LIAR], [0.0, 0.0]], [10**6, 0])]


@pytest.mark.parametrize("method", ["fedproto", "fedsa"])
def test_the_class_statistics_are_pooled_over_the_holders_one_vote_each(method):
    strategy = get_method(method).make_strategy(robust_cfg("median"), {}, 2, 2)
    strategy.server_step(1, {}, prototype_replies())
    # class 0: median of (1, 0.8, 1000) and (0, 0.2, -1000); class 1: its two holders' mean
    assert torch.allclose(strategy.prototypes, torch.tensor([[1.0, 0.0], [0.1, 0.9]]))
    mean = get_method(method).make_strategy(parse_experiment({}), {}, 2, 2)
    mean.server_step(1, {}, prototype_replies())
    assert mean.prototypes[0, 0] > 300  # the method's own average follows the liar


def test_fednh_pools_its_clients_class_directions_one_vote_each():
    """Class 0: two clients point along x, a third (claiming a huge count, which FedNH's own
    sum weights by) points the other way. At rho 0 the prototype is the pooled direction."""
    def reply(pid: int, direction: list[float], count: int) -> ClientReply:
        counts = torch.tensor([count, 10])
        means = torch.tensor([direction, [0.0, 1.0]]) * counts[:, None]  # FedNH's upload
        rows = ClassRows(counts > 0, {"scaled_means": means}, counts)
        return ClientReply(100 + pid, pid, int(counts.sum()), {}, {}, rows)

    replies = [reply(0, [1.0, 0.1], 10), reply(1, [1.0, -0.1], 10), reply(2, [-1.0, 0.0], 10**6)]
    weights = {"classifier.scale": torch.tensor(1.0)}
    for rule, expected_x in (("median", 1.0), ("mean", -1.0)):
        cfg = parse_experiment({"federation": {"aggregation": rule}, "fednh": {"rho": 0.0}})
        strategy = get_method("fednh").make_strategy(cfg, weights, 2, 2)
        strategy.server_step(1, weights, replies)
        assert strategy.prototypes[0, 0].item() == pytest.approx(expected_x, abs=0.01), rule
        assert torch.allclose(strategy.prototypes[1], torch.tensor([0.0, 1.0]), atol=1e-6)


@pytest.mark.parametrize("method", ["fpl", "fedtgp"])
def test_a_method_whose_statistics_are_not_pooled_robustly_refuses_a_robust_rule(method):
    with pytest.raises(ConfigError, match=r"federation\.aggregation.*median"):
        get_method(method).make_strategy(robust_cfg("median"), {}, 10, 8)


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "moon", "fedproto", "fedsa",
                                    "fedhpro", "creff", "fednh"])
def test_the_methods_covered_take_every_rule(method):
    head = {"classifier.weight": torch.zeros(10, 8), "classifier.bias": torch.zeros(10)}
    for rule in ("mean", "median", "trimmed-mean"):
        strategy = get_method(method).make_strategy(robust_cfg(rule), head, 10, 8)
        assert (strategy.pooling is None) == (rule == "mean")
        if hasattr(strategy, "settings"):  # the recalibrating ones pool their statistics too
            assert strategy.settings.pooling == strategy.pooling


@pytest.mark.parametrize(("key", "value"), [("aggregation", "max"), ("trim_fraction", 0.5),
                                            ("trim_fraction", -0.1)])
def test_bad_robust_settings_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=rf"federation\.{key}"):
        parse_experiment({"federation": {key: value}})


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "rule"), [("fedproto", "median"),
                                                ("fedhpro", "trimmed-mean")])
def test_a_simulation_runs_with_a_robust_rule(tmp_path, strategy, rule):
    """Flower's simulation engine, 2 rounds: the rule reaches the ServerApp from the run's
    overrides and the run learns."""
    results = simulate(tmp_path, 2, strategy=strategy,
                       overrides=f"{OVERRIDES} federation.aggregation={rule}")
    assert results["config"]["federation"]["aggregation"] == rule
    assert len(results["rounds"]) == 2
    assert results["rounds"][-1]["accuracy"] > 0.2  # 10 classes: above chance


def moment_stats() -> list[ClassStatistics]:
    """Three clients, one class, d = 2: two honest ones and a liar with a huge count."""
    def stats(mean: list[float], var: float, count: int, grad: list[float]) -> ClassStatistics:
        return ClassStatistics(present=torch.tensor([True]), counts=torch.tensor([count]),
                               feature_grads=torch.tensor([grad]),
                               weight_grads=torch.tensor([[grad]]),
                               bias_grads=torch.tensor([[grad[0]]]),
                               feature_means=torch.tensor([mean]),
                               feature_vars=torch.tensor([var]))

    return [stats([1.0, 1.0], 0.5, 10, [0.1, 0.2]), stats([3.0, 1.0], 0.7, 10, [0.3, 0.2]),
            stats([LIAR, LIAR], 9.0, 10**6, [LIAR, -LIAR])]


def test_fedhpros_moments_pool_robustly_with_the_same_total_variance():
    means, variances, present = pooled_moments(moment_stats(), Pooling("median"))
    # the median of the three means per dimension: (3, 1)
    assert means.tolist() == [[3.0, 1.0]] and present.tolist() == [True]
    # each holder's variance plus its mean's squared distance to (3, 1), averaged over d:
    # 0.5 + (4 + 0) / 2 = 2.5; 0.7 + 0 = 0.7; the liar's is huge: the median is 2.5
    assert variances.tolist() == [2.5]
    weighted, _, _ = pooled_moments(moment_stats())
    assert weighted[0, 0] > 900  # count-weighted, the liar's million samples own the class


def test_the_classifier_gradients_pool_robustly():
    target, present = mean_class_gradients(moment_stats(), Pooling("median"))
    assert present.tolist() == [True]
    assert torch.allclose(target.feature, torch.tensor([[0.3, 0.2]]))
    assert torch.allclose(target.weight, torch.tensor([[[0.3, 0.2]]]))
    assert torch.allclose(target.bias, torch.tensor([[0.3]]))
    averaged, _ = mean_class_gradients(moment_stats())
    assert averaged.feature[0, 0] > 300
