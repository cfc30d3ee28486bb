"""CReFF (Shang et al., IJCAI 2022): FedAvg plus a classifier re-trained on federated features.

Clients train on CE only. Before training they measure per-class classifier gradients at the
global extractor and the server's re-trained classifier. The server FedAvgs the weights,
matches its federated features to those gradients, trains a fresh classifier on them and
evaluates the FedAvg extractor with it; the clients keep training the FedAvg'd model, as in
CReFF's code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from fedhpro_flwr.algorithms.extraction import (
    extract_class_statistics,
    private_class_statistics,
)
from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.recalibration import RecalibrationSettings
from fedhpro_flwr.algorithms.training import train_epochs
from fedhpro_flwr.config import ExperimentConfig, setting
from fedhpro_flwr.data.federated import TensorData
from fedhpro_flwr.methods.base import ClientTask, Method
from fedhpro_flwr.methods.payload import (
    encode_class_statistics,
    record_to_tensors,
    required_record,
    tensors_to_record,
)
from fedhpro_flwr.methods.recalibrating import STATS_RECORD, RecalibratingStrategy
from fedhpro_flwr.methods.strategy import ClientReply

HEAD_RECORD = "retrained-classifier"


@dataclass(frozen=True)
class CReFFConfig:
    """CReFF (Shang et al., IJCAI 2022), its code's defaults; 0 batch size = train.batch_size."""

    batch_real: int = setting(32, ge=1)
    repeat_num: int = setting(10, ge=1)
    features: int = setting(100, ge=1)  # federated features per class
    match_steps: int = setting(100, ge=0)
    feature_lr: float = setting(0.1, gt=0.0)
    epochs: int = setting(300, ge=1)
    lr: float = setting(0.01, gt=0.0)
    batch_size: int = setting(0, ge=0)


def client_train(task: ClientTask) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
    """Classifier gradients at (global extractor, re-trained classifier), then CE training."""
    model, creff = task.model, task.cfg.section(CReFFConfig)
    c, d = task.data.num_classes, model.feature_dim
    head = record_to_tensors(required_record(task.content, HEAD_RECORD),
                             {"weight": ((c, d), "float"), "bias": ((c,), "float")},
                             "re-trained classifier")
    measured_at = (head["weight"], head["bias"])
    stats = (extract_class_statistics(model, task.data, creff.batch_real, creff.repeat_num,
                                      task.generator, task.device, head=measured_at)
             if task.privacy is None else
             private_class_statistics(model, task.data, task.privacy, task.device, measured_at))
    metrics = train_epochs(model, task.data, task.cfg.train, task.generator, task.device,
                           privacy=task.privacy)
    return {STATS_RECORD: encode_class_statistics(stats, feature_grads=False)}, metrics


class CReFFStrategy(RecalibratingStrategy):
    """FedAvg, plus federated features and the classifier re-trained on them (`head`)."""

    def __init__(self, cfg: ExperimentConfig, reference_state: Mapping[str, torch.Tensor],
                 num_classes: int, feature_dim: int):
        creff = cfg.section(CReFFConfig)
        settings = RecalibrationSettings(creff.match_steps, creff.feature_lr, creff.epochs,
                                         creff.lr, creff.batch_size or cfg.train.batch_size)
        super().__init__(cfg, reference_state, num_classes, feature_dim, creff.features,
                         settings, torch.Generator().manual_seed(cfg.seed))

    def train_records(self) -> dict[str, ArrayRecord]:
        return {HEAD_RECORD: tensors_to_record(self.head)}

    def server_step(self, server_round: int, weights: dict[str, torch.Tensor],
                    replies: list[ClientReply]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        result = self.recalibrate(replies)
        self.head = {"weight": result.weight, "bias": result.bias}
        return weights, result.diagnostics()

    def evaluate_model(self, model: Backbone, data: TensorData,
                       device: torch.device) -> dict[str, float]:
        """The FedAvg extractor with the re-trained classifier (what CReFF reports)."""
        with torch.no_grad():
            model.classifier.weight.copy_(self.head["weight"])
            model.classifier.bias.copy_(self.head["bias"])
        return super().evaluate_model(model, data, device)


METHOD = Method("creff", client_train, CReFFStrategy, section=CReFFConfig)
