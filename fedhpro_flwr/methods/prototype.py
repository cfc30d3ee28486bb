"""What the prototype methods (FedProto, FedTGP, FPL) share.

Clients upload their class prototypes (mean features) and counts after local training; the
server keeps global prototypes, sends them every round, and also reports the accuracy of
classifying test samples by their nearest global prototype (the FedProto and FedTGP papers'
inference rule) beside the global model's classifier accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict

from fedhpro_flwr.algorithms.diagnostics import consistency_metric
from fedhpro_flwr.algorithms.losses import prototype_mse
from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.prototypes import local_prototypes, nearest_prototype_accuracy
from fedhpro_flwr.algorithms.training import train_epochs
from fedhpro_flwr.config import ExperimentConfig
from fedhpro_flwr.data.federated import TensorData
from fedhpro_flwr.methods.base import ClientTask, ClientTrainer
from fedhpro_flwr.methods.payload import (
    ClassRows,
    decode_class_rows,
    encode_class_rows,
    required_record,
)
from fedhpro_flwr.methods.strategy import ClientReply, ExperimentStrategy, checked_state

LOCAL_RECORD = "local-prototypes"
GLOBAL_RECORD = "global-prototypes"


def upload_prototypes(task: ClientTask, received: tuple[torch.Tensor, torch.Tensor]
                      ) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
    """The reply's prototype record (the trained model's class means and class counts) and,
    with `diagnostics.consistency`, their consistency with the `received` global ones."""
    protos, counts = local_prototypes(task.model, task.data, task.device, task.privacy)
    metrics = (consistency_metric(protos, counts > 0, *received)
               if task.cfg.diagnostics.consistency else {})
    return {LOCAL_RECORD: encode_class_rows(counts > 0, {"prototypes": protos}, counts)}, metrics


def received_prototypes(task: ClientTask) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's global prototypes (C, d) and which classes have one, on the device."""
    decoded = decode_class_rows(required_record(task.content, GLOBAL_RECORD), task.data.num_classes,
                                {"prototypes": (task.model.feature_dim,)}, "global prototypes")
    return decoded.rows["prototypes"].to(task.device), decoded.present.to(task.device)


def prototype_mse_trainer(weight: Callable[[ExperimentConfig], float]) -> ClientTrainer:
    """A client trainer on CE + weight * MSE(z, global prototype of y): FedProto and FedTGP."""

    def client_train(task: ClientTask) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
        protos, present = received_prototypes(task)
        lam = weight(task.cfg)

        def regulariser(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return lam * prototype_mse(z, y, protos, present)

        metrics = train_epochs(task.model, task.data, task.cfg.train, task.generator,
                               task.device, regulariser if bool(present.any()) else None,
                               privacy=task.privacy)
        records, diagnostics = upload_prototypes(task, (protos, present))
        return records, metrics | diagnostics

    return client_train


class PrototypeStrategy(ExperimentStrategy):
    """Holds the global prototypes; subclasses say how the clients' prototypes update them."""

    # each method says whether `update_prototypes` pools by `federation.aggregation`
    pools_statistics = False

    def __init__(self, cfg: ExperimentConfig, reference_state: Mapping[str, torch.Tensor],
                 num_classes: int, feature_dim: int):
        super().__init__(cfg, reference_state)
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.prototypes = torch.zeros(num_classes, feature_dim)
        self.present = torch.zeros(num_classes, dtype=torch.bool)

    def update_prototypes(self, server_round: int, replies: list[ClientReply]) -> dict[str, float]:
        """Set `prototypes` and `present` from the replies' `ClassRows`; return diagnostics."""
        raise NotImplementedError

    @staticmethod
    def stacked(replies: list[ClientReply]) -> tuple[torch.Tensor, torch.Tensor]:
        """The replies' prototypes (K, C, d) and class counts (K, C)."""
        rows: list[ClassRows] = [r.extra for r in replies]  # decoded with counts
        return (torch.stack([r.rows["prototypes"] for r in rows]),
                torch.stack([r.counts for r in rows]))  # type: ignore[misc]

    def train_records(self) -> dict[str, ArrayRecord]:
        return {GLOBAL_RECORD: encode_class_rows(self.present, {"prototypes": self.prototypes})}

    def decode_extra(self, content: RecordDict) -> ClassRows:
        return decode_class_rows(required_record(content, LOCAL_RECORD, "reply"), self.num_classes,
                                 {"prototypes": (self.feature_dim,)}, "local prototypes",
                                 with_counts=True)

    def global_anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prototypes, self.present

    def server_step(self, server_round: int, weights: dict[str, torch.Tensor],
                    replies: list[ClientReply]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        diagnostics = self.update_prototypes(server_round, replies)
        return weights, {"prototype_classes": float(self.present.sum()), **diagnostics}

    def evaluate_model(self, model: Backbone, data: TensorData,
                       device: torch.device) -> dict[str, float]:
        scores = super().evaluate_model(model, data, device)
        scores["prototype_accuracy"] = nearest_prototype_accuracy(
            model, data, self.prototypes, self.present, device
        )
        return scores

    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": self.prototypes, "present": self.present}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        restored = checked_state(state, {"prototypes": self.prototypes,
                                         "present": self.present})
        self.prototypes, self.present = restored["prototypes"], restored["present"]
