"""Heterogeneous clients: each runs its own backbone, only class-level knowledge is shared.

With `model.backbones` set, client k runs backbone k mod n (or its node config's `backbone`),
every backbone ending in features of the same dimension d. Each client's model stays on
the client between rounds (in Flower's `context.state`); the server sees only what the method
shares at the class level, plus, for FedHPro, the linear head (C x d), averaged. Accuracy is
personalised: every client evaluates its own model on a held-out part of its data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import RecordDict

from fedhpro_flwr.algorithms.models import Backbone, build_model
from fedhpro_flwr.app.payload import check_state_dict, tensors_to_record
from fedhpro_flwr.config import ConfigError, ExperimentConfig
from fedhpro_flwr.data.federated import DataSpec, TensorData
from fedhpro_flwr.data.partition import stratified_split
from fedhpro_flwr.methods import METHODS, Method

LOCAL_MODEL = "local-model"  # the client's whole model, in its context.state
HEAD_KEYS = ("classifier.weight", "classifier.bias")


def is_hetero(cfg: ExperimentConfig) -> bool:
    return bool(cfg.model.backbone_list())


def check_method(method: Method, cfg: ExperimentConfig) -> None:
    """Refuse a method that averages whole models when the clients' architectures differ."""
    if method.hetero_sharing is None:
        usable = sorted(name for name, m in METHODS.items() if m.hetero_sharing is not None)
        raise ConfigError(
            f"strategy '{method.name}' averages the clients' model weights, which cannot be done "
            f"when they run different backbones (model.backbones = {cfg.model.backbones!r}); "
            f"with heterogeneous clients use one of {', '.join(usable)}")


def shared_part(state: Mapping[str, torch.Tensor], method: Method) -> dict[str, torch.Tensor]:
    """The weights a method exchanges between heterogeneous clients and the server."""
    keys = HEAD_KEYS if method.hetero_sharing == "head" else ()
    return {k: state[k] for k in keys}


def assigned_backbone(cfg: ExperimentConfig, partition_id: int,
                      node_config: Mapping[str, Any]) -> tuple[str, int]:
    """The node config's `backbone` (e.g. "resnet10-16"), else entry k mod n of the list."""
    choice = node_config.get("backbone")
    if choice:
        try:
            (found,) = type(cfg.model)(backbones=str(choice)).backbone_list()
        except (ConfigError, ValueError):
            raise ConfigError(f"node config 'backbone' = {choice!r}: expected one backbone, "
                              f"cnn-W or resnet10-W") from None
        return found
    backbones = cfg.model.backbone_list()
    return backbones[partition_id % len(backbones)]


def local_split(data: TensorData, cfg: ExperimentConfig,
                partition_id: int) -> tuple[TensorData, TensorData]:
    """(train, test): the client's data with `partition.local_test_fraction` of every class
    held out for its personalised evaluation, the same split every round."""
    train, test = stratified_split(data.y.numpy(), cfg.partition.local_test_fraction,
                                   cfg.seed * 1_000_003 + partition_id)
    return data.subset(train), data.subset(test)


def local_model(cfg: ExperimentConfig, spec: DataSpec, backbone: tuple[str, int],
                state: RecordDict, seed: int) -> tuple[Backbone, bool]:
    """The client's model as it left the last round (from its context state), or, on its
    first round, freshly drawn from `seed`; and whether it was restored."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(cfg.model, spec, backbone)
    if LOCAL_MODEL not in state.array_records:
        return model, False
    saved = check_state_dict(state.array_records[LOCAL_MODEL], model.state_dict(),
                             "the client's saved model")
    model.load_state_dict(saved)
    return model, True


def save_local_model(model: torch.nn.Module, state: RecordDict) -> None:
    state[LOCAL_MODEL] = tensors_to_record(model.state_dict())
