"""A method is a pair: a client trainer and a server Strategy, registered under one name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from flwr.app import ArrayRecord, RecordDict

from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.privacy import ClientPrivacy
from fedhpro_flwr.config import ExperimentConfig
from fedhpro_flwr.data.federated import TensorData
from fedhpro_flwr.methods.strategy import ExperimentStrategy


class KeptModel(Protocol):
    """The client's own model as it left the last round it trained, kept on its node between
    rounds (MOON's previous model); the ClientApp's is `app.kept.NodeKeptModel`."""

    def load(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(the round it was trained in, its weights); None before the client's first round."""
        ...

    def save(self, state: Mapping[str, torch.Tensor]) -> None:
        """Keep `state` as the client's model of this round."""
        ...


@dataclass
class ClientTask:
    """Everything a client trainer needs; the model already holds the global weights."""

    model: Backbone
    data: TensorData
    content: RecordDict  # the received message's records (method payloads)
    cfg: ExperimentConfig
    device: torch.device
    generator: torch.Generator
    kept: KeptModel | None = None  # None: nothing outlives this training (no node behind it)
    # the round's differential privacy: DP-SGD and noisy class statistics; None when off
    privacy: ClientPrivacy | None = None


# returns (extra ArrayRecords for the reply, train metrics); trains task.model in place
ClientTrainer = Callable[[ClientTask], tuple[dict[str, ArrayRecord], dict[str, float]]]
StrategyFactory = Callable[
    [ExperimentConfig, Mapping[str, torch.Tensor], int, int], ExperimentStrategy
]


@dataclass(frozen=True)
class Method:
    """A registered federated method."""

    name: str
    client_train: ClientTrainer
    new_strategy: StrategyFactory  # (cfg, reference weights, num_classes, feature_dim)
    # its hyper-parameters: a frozen dataclass of `config.setting` fields, read from the YAML
    # section named like the method (`cfg.section(...)` gives it); None: it has none
    section: type | None = None
    # with personal models (heterogeneous backbones): the weights that are averaged, e.g. the
    # linear head, or () when only class-level knowledge leaves a client; None: the method
    # averages whole models, which personal models of different shapes cannot do
    personal_weights: tuple[str, ...] | None = None
    # the method's model around the configured backbone (MOON: a projection head before the
    # classifier), on the server and every client; None: the backbone as it is
    extend_model: Callable[[Backbone, ExperimentConfig], Backbone] | None = None

    def make_strategy(self, cfg: ExperimentConfig, reference: Mapping[str, torch.Tensor],
                      num_classes: int, feature_dim: int) -> ExperimentStrategy:
        """The server Strategy, seeing (and sending clients) this method's section only."""
        return self.new_strategy(cfg.only(self.name), reference, num_classes, feature_dim)
