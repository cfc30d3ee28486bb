"""FPL, Federated Prototype Learning (Huang et al., CVPR 2023).

The server clusters each class's client prototypes with FINCH and keeps the cluster means
(several per class when clients disagree, e.g. across domains) and their mean, the unbiased
prototype. Clients train on CE + InfoNCE over the cluster prototypes (tau 0.02) + MSE to the
unbiased prototype. The weights are FedAvg'd.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedhpro_flwr.algorithms.finch import cluster_means, finch
from fedhpro_flwr.algorithms.losses import fpl_loss
from fedhpro_flwr.algorithms.training import train_epochs
from fedhpro_flwr.config import setting
from fedhpro_flwr.methods.base import ClientTask, Method
from fedhpro_flwr.methods.payload import (
    PayloadError,
    record_to_tensors,
    required_record,
    tensors_to_record,
)
from fedhpro_flwr.methods.prototype import PrototypeStrategy, received_prototypes, upload_prototypes
from fedhpro_flwr.methods.strategy import ClientReply

CLUSTER_RECORD = "cluster-prototypes"


@dataclass(frozen=True)
class FPLConfig:
    """FPL (Huang et al., CVPR 2023): InfoNCE temperature over the cluster prototypes."""

    tau: float = setting(0.02, gt=0.0)


def decode_clusters(record: ArrayRecord, present: torch.Tensor,
                    feature_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster prototypes (N, d) and their classes (N,), checked against `present`."""
    t = record_to_tensors(record, {"prototypes": ((None, feature_dim), "float"),
                                   "labels": ((None,), "int")}, "cluster prototypes")
    protos, labels = t["prototypes"], t["labels"]
    if len(protos) != len(labels):
        raise PayloadError(f"cluster prototypes: {len(protos)} prototypes, {len(labels)} labels")
    present = present.cpu()
    covered = torch.zeros_like(present)
    if len(labels):
        if labels.min() < 0 or labels.max() >= len(present):
            raise PayloadError(f"cluster prototypes: labels {labels.tolist()} out of range")
        covered[labels] = True
    if not torch.equal(covered, present):
        raise PayloadError("cluster prototypes: their classes differ from the global ones")
    return protos, labels


def client_train(task: ClientTask) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
    """CE + FPL's cluster InfoNCE and unbiased-prototype MSE, then upload prototypes."""
    unbiased, present = received_prototypes(task)
    clusters, labels = decode_clusters(required_record(task.content, CLUSTER_RECORD), present,
                                       task.model.feature_dim)
    clusters, labels = clusters.to(task.device), labels.to(task.device)
    tau = task.cfg.section(FPLConfig).tau

    def regulariser(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return fpl_loss(z, y, clusters, labels, unbiased, present, tau)

    metrics = train_epochs(task.model, task.data, task.cfg.train, task.generator, task.device,
                           regulariser if bool(present.any()) else None, privacy=task.privacy)
    records, diagnostics = upload_prototypes(task, (unbiased, present))
    return records, metrics | diagnostics


class FPLStrategy(PrototypeStrategy):
    """Per class: FINCH over the clients' prototypes, cluster means, and their mean."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.clusters = torch.zeros(0, self.feature_dim)
        self.cluster_labels = torch.zeros(0, dtype=torch.long)

    def update_prototypes(self, server_round: int, replies: list[ClientReply]) -> dict[str, float]:
        protos, counts = self.stacked(replies)
        held = counts > 0
        clusters, labels = [], []
        for c in torch.nonzero(held.any(dim=0)).flatten().tolist():
            points = protos[held[:, c], c]
            means = cluster_means(points, finch(points)[-1])
            clusters.append(means)
            labels.append(torch.full((len(means),), c, dtype=torch.long))
        self.clusters, self.cluster_labels = torch.cat(clusters), torch.cat(labels)
        self.present = held.any(dim=0)
        self.prototypes = torch.zeros(self.num_classes, self.feature_dim).index_add_(
            0, self.cluster_labels, self.clusters
        ) / torch.bincount(self.cluster_labels, minlength=self.num_classes).clamp(min=1)[:, None]
        return {"clusters_per_class": len(self.clusters) / max(int(self.present.sum()), 1)}

    def train_records(self) -> dict[str, ArrayRecord]:
        return {**super().train_records(), CLUSTER_RECORD: tensors_to_record(
            {"prototypes": self.clusters, "labels": self.cluster_labels})}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "clusters": self.clusters,
                "cluster_labels": self.cluster_labels}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        clusters, labels = state.get("clusters"), state.get("cluster_labels")
        if not isinstance(clusters, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise ValueError("checkpoint lacks FPL's 'clusters' / 'cluster_labels'")
        self.clusters, self.cluster_labels = clusters.clone(), labels.clone()


METHOD = Method("fpl", client_train, FPLStrategy, section=FPLConfig)
