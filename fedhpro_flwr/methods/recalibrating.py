"""Server state shared by the methods that re-train the classifier (CReFF, FedHPro).

Both receive per-class statistics, keep federated features, and match them at the classifier
the clients measured their gradients at: the one sent at the start of the round (`head`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from flwr.app import RecordDict

from fedhpro_flwr.algorithms.extraction import ClassStatistics
from fedhpro_flwr.algorithms.recalibration import (
    FederatedFeatures,
    RecalibrationResult,
    RecalibrationSettings,
)
from fedhpro_flwr.config import ExperimentConfig
from fedhpro_flwr.methods.payload import decode_class_statistics, required_record
from fedhpro_flwr.methods.strategy import ClientReply, ExperimentStrategy, checked_state

STATS_RECORD = "class-stats"


class RecalibratingStrategy(ExperimentStrategy):
    """Decodes class statistics and owns the federated features, `head` and the RNG `rng`."""

    def __init__(self, cfg: ExperimentConfig, reference_state: Mapping[str, torch.Tensor],
                 num_classes: int, feature_dim: int, features_per_class: int,
                 settings: RecalibrationSettings, generator: torch.Generator,
                 classifier_gradients: bool = True, feature_gradients: bool = False,
                 moments: bool = False):
        super().__init__(cfg, reference_state)
        # what replies carry; feature gradients that do not travel are rebuilt at `head`
        self.classifier_gradients = classifier_gradients
        self.feature_gradients = feature_gradients
        self.moments = moments
        self.num_classes, self.feature_dim = num_classes, feature_dim
        # the clients' statistics pooled as the weights are (`federation.aggregation`)
        self.settings = replace(settings, pooling=self.pooling)
        self.rng = generator
        self.federated = FederatedFeatures(num_classes, features_per_class, feature_dim,
                                           generator)
        # round 1 measures at the initial model's classifier
        self.head = {"weight": reference_state["classifier.weight"].detach().clone(),
                     "bias": reference_state["classifier.bias"].detach().clone()}

    def decode_extra(self, content: RecordDict) -> ClassStatistics:
        return decode_class_statistics(
            required_record(content, STATS_RECORD, "reply"), self.num_classes, self.feature_dim,
            classifier=self.classifier_gradients,
            measured_at=None if self.feature_gradients else self.head["weight"],
            moments=self.moments)

    def recalibrate(self, replies: list[ClientReply]) -> RecalibrationResult:
        """Match the features at `head` to the replies' gradients (or draw them from the
        replies' moments); re-train a classifier."""
        return self.federated.recalibrate(self.head["weight"], self.head["bias"],
                                          [r.extra for r in replies], self.settings,
                                          self.rng)

    def state_dict(self) -> dict[str, Any]:
        return {**self.federated.state_dict(), "head_weight": self.head["weight"],
                "head_bias": self.head["bias"], "generator": self.rng.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        restored = checked_state(state, {"head_weight": self.head["weight"],
                                         "head_bias": self.head["bias"],
                                         **self.federated.state_dict()})
        self.head = {"weight": restored.pop("head_weight"), "bias": restored.pop("head_bias")}
        self.federated.load_state_dict(restored)
        self.rng.set_state(state["generator"])
