"""Adding a method is one module and one registry line: a toy method, registered the way the
registry's list registers a module's METHOD, validates its own config section, sends only
that section to its clients, and runs a round through the real client handler and strategy.
"""

from dataclasses import dataclass

import pytest
import torch
from flwr.app import ArrayRecord
from test_method_round import client_replies

from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.algorithms.training import train_epochs
from fedhpro_flwr.config import ConfigError, setting
from fedhpro_flwr.data.federated import dataset_spec
from fedhpro_flwr.methods import METHODS, SECTIONS, ClientTask, Method, parse_experiment
from fedhpro_flwr.methods.strategy import ClientReply, ExperimentStrategy, mean_metric

pytestmark = pytest.mark.usefixtures("serverapp_identity")


@dataclass(frozen=True)
class ToyConfig:
    """The toy's one knob: how strongly features are pulled towards zero."""

    pull: float = setting(0.5, ge=0.0)


def client_train(task: ClientTask) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
    pull = task.cfg.section(ToyConfig).pull

    def regulariser(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pull * z.pow(2).mean()

    metrics = train_epochs(task.model, task.data, task.cfg.train, task.generator, task.device,
                           regulariser)
    return {}, metrics | {"pull": pull}


class ToyStrategy(ExperimentStrategy):
    def server_step(self, server_round: int, weights: dict[str, torch.Tensor],
                    replies: list[ClientReply]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return weights, {"pull": mean_metric(replies, "pull")}


TOY = Method("toy", client_train, lambda cfg, ref, _c, _d: ToyStrategy(cfg, ref),
             section=ToyConfig)


@pytest.fixture
def registered(monkeypatch):
    """The registry with the toy's line added (what listing its module there does)."""
    monkeypatch.setitem(METHODS, TOY.name, TOY)
    monkeypatch.setitem(SECTIONS, TOY.name, TOY.section)


def test_a_registered_method_runs_a_round_with_its_own_section(registered):
    cfg = parse_experiment({"partition": {"num_partitions": 3}, "train": {"local_epochs": 1},
                            "toy": {"pull": 0.25}})
    with pytest.raises(ConfigError, match=r"'toy.pull' = -1: must be >= 0"):
        parse_experiment({"toy": {"pull": -1}})
    info = dataset_spec(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info)
    strategy = TOY.make_strategy(cfg, model.state_dict(), info.num_classes, model.feature_dim)
    # what its messages carry: the common sections and the toy's own, no other method's
    sections = {key.split(".")[0] for key in strategy.cfg.to_flat() if "." in key}
    assert "toy" in sections and not sections & (set(METHODS) - {"toy"})

    replies = client_replies("toy", strategy, model, cfg)
    assert [r.content.metric_records["metrics"]["pull"] for r in replies] == [0.25] * 3
    weights, _ = strategy.aggregate_train(1, replies)
    assert weights is not None and strategy.report is not None
    assert strategy.report.participants == [0, 1, 2] and strategy.report.diagnostics == {
        "pull": 0.25}
    assert not torch.equal(weights.to_torch_state_dict()["classifier.weight"],
                           model.state_dict()["classifier.weight"])


def test_an_unregistered_section_is_an_unknown_key():
    with pytest.raises(ConfigError, match="unknown config key 'toy'"):
        parse_experiment({"toy": {"pull": 0.25}})
