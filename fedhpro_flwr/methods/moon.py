"""MOON, model-contrastive federated learning (Li, He and Song, CVPR 2021; QinbinLi/MOON).

Its model puts a projection head between the backbone's features and the classifier
(`contrastive.ProjectedBackbone`). A client adds ``mu * l_con`` to its CE: its projections
pulled towards those of the global model it received and pushed from those of its own model
as it left the last round it trained (both frozen; MOON's `model_buffer_size` of one). In a
client's first round the global model stands in for the previous one, which makes the term a
constant log 2 without gradient: the update MOON's code makes while its pool of previous
models is still empty. The server is FedAvg.

The previous model is kept on the client's node (`ClientTask.kept`: the context state, and
the node's disk for a restarted SuperNode or a resumed run). Clients report which round theirs
came from; a resumed run whose clients lost theirs stops, as one with personal models does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedhpro_flwr.algorithms.contrastive import (
    ProjectedBackbone,
    frozen_copy,
    model_contrastive_loss,
)
from fedhpro_flwr.algorithms.models import Backbone, kaiming_init
from fedhpro_flwr.algorithms.training import train_batches
from fedhpro_flwr.config import ConfigError, ExperimentConfig, setting
from fedhpro_flwr.methods.base import ClientTask, Method
from fedhpro_flwr.methods.strategy import ClientReply, ExperimentStrategy, mean_metric

# the round whose trained model was the client's negative; 0: none, the global model stood in
PREVIOUS_ROUND = "previous_round"


@dataclass(frozen=True)
class MoonConfig:
    """MOON (Li, He and Song, CVPR 2021): the contrastive term's weight and temperature and
    the projection head's output dimension, at its code's defaults (main.py)."""

    mu: float = setting(1.0, ge=0.0)
    temperature: float = setting(0.5, gt=0.0)
    out_dim: int = setting(256, ge=1)


def with_projection_head(model: Backbone, cfg: ExperimentConfig) -> Backbone:
    """MOON's model: the configured backbone with its projection head, initialised as
    `model.init` says. PyTorch's default (MOON's code's) slows the small CNN's start: on the
    default setting, client 0's training accuracy after its first 5 epochs was 0.21 with the
    head, 0.58 without it; with model.init=kaiming 0.74 and 0.86."""
    projected = ProjectedBackbone(model, cfg.section(MoonConfig).out_dim)
    return kaiming_init(projected) if cfg.model.init == "kaiming" else projected


def client_train(task: ClientTask) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
    """CE + mu * l_con against the frozen global and previous models; then keep the trained
    model as the next round's previous one."""
    moon = task.cfg.section(MoonConfig)
    global_model = frozen_copy(task.model)  # the model holds the received weights
    kept = task.kept.load() if task.kept is not None else None
    previous = global_model if kept is None else frozen_copy(task.model, kept[1])
    contrastive = torch.zeros((), dtype=torch.float64, device=task.device)
    steps = [0]

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = task.model.features(x)
        ce = F.cross_entropy(task.model.classifier(z), y)
        with torch.no_grad():
            z_global = global_model.features(x)
            z_previous = z_global if previous is global_model else previous.features(x)
        term = model_contrastive_loss(z, z_global, z_previous, moon.temperature)
        contrastive.add_(term.detach())
        steps[0] += 1
        return ce + moon.mu * term, ce

    metrics = train_batches(task.model, task.data, task.cfg.train, task.generator, task.device,
                            batch_loss, privacy=task.privacy)
    if task.kept is not None:
        task.kept.save(task.model.state_dict())
    return {}, metrics | {"model_contrastive": contrastive.item() / max(steps[0], 1),
                          PREVIOUS_ROUND: float(kept[0]) if kept is not None else 0.0}


class MoonStrategy(ExperimentStrategy):
    """FedAvg that follows which clients trained against their own previous model."""

    def __init__(self, cfg: ExperimentConfig, reference_state: Mapping[str, torch.Tensor]):
        super().__init__(cfg, reference_state)
        self.trained: set[int] = set()  # partitions that trained: each has a previous model

    def server_step(self, server_round: int, weights: dict[str, torch.Tensor],
                    replies: list[ClientReply]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        continued = [r.partition_id for r in replies if r.metrics.get(PREVIOUS_ROUND, 0.0) > 0]
        lost = sorted({r.partition_id for r in replies} & self.trained - set(continued))
        if lost and self.round_offset and server_round == self.round_offset + 1:
            raise ConfigError(  # the run config's resume cannot be honoured: a run stopper
                f"round {server_round} of a resumed run: partitions {lost} had trained but "
                "found no model of an earlier round of theirs under <data.root>/personal-models "
                "on their node (resumed on other machines, or the files were deleted); MOON "
                "would train them against the global model instead, so run the experiment "
                "afresh (resume=false)")
        if lost:
            log(WARNING, "round %d: partitions %s had trained but found no previous model on "
                "their node (restarted elsewhere?); the global model stood in", server_round,
                lost)
        self.trained |= {r.partition_id for r in replies}
        return weights, {"model_contrastive": mean_metric(replies, "model_contrastive"),
                         "previous_models": float(len(continued))}

    def state_dict(self) -> dict[str, Any]:
        return {"trained_partitions": torch.tensor(sorted(self.trained), dtype=torch.long)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        trained = state.get("trained_partitions")
        if not isinstance(trained, torch.Tensor) or trained.dim() != 1:
            raise ValueError("checkpoint lacks MOON's 'trained_partitions'")
        self.trained = set(trained.tolist())


METHOD = Method("moon", client_train, lambda cfg, ref, _c, _d: MoonStrategy(cfg, ref),
                section=MoonConfig, extend_model=with_projection_head)
