"""FedNH (Dai et al., AAAI 2023; Yutong-Dai/FedNH): FedAvg with a scaled cosine classifier over
class prototypes that start spread out and are smoothed towards the clients' class means.

Its model is the configured backbone with FedNH's head (`algorithms.fednh.CosineBackbone`):
normalised features, ``logits = s * normalize(f) @ P^T``, the scale s learnt (or fixed) and
averaged with the backbone. The server draws P with orthonormal rows from the experiment's
seed and sends it every round; clients train on plain CE with P frozen, gradients clipped at
`max_grad_norm`, then upload per class the re-normalised mean of their unit features times
the class count, and the counts. The server FedAvgs the model (sample-weighted, as every
method here; FedNH's code weighs its clients equally) and moves the prototypes of the classes
some client held, ``P <- normalize(rho P + (1 - rho) normalize(sum scaled means / sum
counts))``. The global model, evaluated on the server, is the averaged backbone and scale
with the new P.

FedNH averages whole models, so it does not run with personal backbones of different shapes
(`model.backbones`): its prototypes are anchors in the one embedding space a shared backbone
produces, and sharing only them would make it another method.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, RecordDict

from fedhpro_flwr.algorithms.diagnostics import consistency_metric
from fedhpro_flwr.algorithms.fednh import (
    CosineBackbone,
    orthonormal_prototypes,
    scaled_class_means,
    smoothed_prototypes,
)
from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.prototypes import local_prototypes
from fedhpro_flwr.algorithms.training import train_epochs
from fedhpro_flwr.config import ConfigError, ExperimentConfig, setting
from fedhpro_flwr.data.federated import TensorData
from fedhpro_flwr.methods.base import ClientTask, Method
from fedhpro_flwr.methods.payload import (
    ClassRows,
    PayloadError,
    decode_class_rows,
    encode_class_rows,
    record_to_tensors,
    required_record,
    tensors_to_record,
)
from fedhpro_flwr.methods.strategy import ClientReply, ExperimentStrategy, checked_state

PROTOTYPES_RECORD = "fednh-prototypes"  # the server's P, (C, d), to every client
MEANS_RECORD = "fednh-class-means"  # a client's scaled class means and counts
SCALE_KEY = "classifier.scale"  # s in the model's state dict


@dataclass(frozen=True)
class FedNHConfig:
    """FedNH (Dai et al., AAAI 2023), at its code's defaults: the smoothing rho
    (`FedNH_smoothing`), the scale's start and whether it is learnt (its code fixes it at 30
    with `FedNH_fix_scaling`), and the clients' gradient clipping norm."""

    rho: float = setting(0.9)  # in [0, 1), checked below
    scale: float = setting(1.0, gt=0.0)  # s at the start (its CNNs'; its ResNets start at 20)
    learn_scale: bool = setting(True)
    max_grad_norm: float = setting(10.0, gt=0.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rho < 1.0:
            raise ConfigError(
                f"config key 'fednh.rho' = {self.rho!r}: must be in [0, 1), the weight of the "
                f"old prototypes in the server's moving average (1 would never move them)")


def with_cosine_classifier(model: Backbone, cfg: ExperimentConfig) -> Backbone:
    """FedNH's model: the configured backbone with its normalised features and cosine head."""
    fednh = cfg.section(FedNHConfig)
    return CosineBackbone(model, fednh.scale, fednh.learn_scale)


def cosine_model(model: Backbone) -> CosineBackbone:
    """`model` as FedNH's model, or an error saying it was built without FedNH's head."""
    if not isinstance(model, CosineBackbone):
        raise TypeError(f"FedNH needs its own model (CosineBackbone), got {type(model).__name__}")
    return model


def decode_prototypes(content: RecordDict, num_classes: int, dim: int) -> torch.Tensor:
    """The server's (C, d) prototypes as a client receives them, checked."""
    return record_to_tensors(required_record(content, PROTOTYPES_RECORD),
                             {"prototypes": ((num_classes, dim), "float")},
                             "FedNH prototypes")["prototypes"]


def client_train(task: ClientTask) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
    """CE through the cosine head over the received, frozen prototypes; then the scaled class
    means of the trained model."""
    fednh = task.cfg.section(FedNHConfig)
    model = cosine_model(task.model)
    prototypes = decode_prototypes(task.content, task.data.num_classes, model.feature_dim)
    model.set_prototypes(prototypes.to(task.device))
    metrics = train_epochs(model, task.data, task.cfg.train, task.generator, task.device,
                           max_grad_norm=fednh.max_grad_norm, privacy=task.privacy)
    # of the unit features
    means, counts = local_prototypes(model, task.data, task.device, task.privacy)
    if task.cfg.diagnostics.consistency:
        metrics |= consistency_metric(means, counts > 0, prototypes,
                                      torch.ones(len(prototypes), dtype=torch.bool))
    upload = encode_class_rows(counts > 0, {"scaled_means": scaled_class_means(means, counts)},
                               counts)
    return {MEANS_RECORD: upload}, metrics


def decode_class_means(record: ArrayRecord, num_classes: int, dim: int) -> ClassRows:
    """A reply's scaled class means, checked: beside the shapes, finiteness and counts, each
    row's length must be its class's count (a unit mean times the count) or 0 (a class whose
    features are all zero), so that no client weighs more than its samples."""
    decoded = decode_class_rows(record, num_classes, {"scaled_means": (dim,)},
                                "FedNH class means", with_counts=True)
    assert decoded.counts is not None
    norms = decoded.rows["scaled_means"].norm(dim=1).double()
    counts = decoded.counts.double()
    wrong = (norms > 0) & ((norms - counts).abs() > 1e-3 * counts)
    if bool(wrong.any()):
        classes = torch.nonzero(wrong).flatten().tolist()
        raise PayloadError(f"FedNH class means: the rows of classes {classes} have lengths "
                           f"{norms[wrong].tolist()}, not their counts {counts[wrong].tolist()}")
    return decoded


class FedNHStrategy(ExperimentStrategy):
    """FedAvg that holds the prototypes P, sends them, smooths them towards the uploaded class
    means and evaluates the global model with them."""

    # its clients' class-mean directions: `pooled_classes`
    pools_statistics = True

    def __init__(self, cfg: ExperimentConfig, reference_state: Mapping[str, torch.Tensor],
                 num_classes: int, feature_dim: int):
        if cfg.privacy.enabled and cfg.section(FedNHConfig).learn_scale:
            raise ConfigError("privacy.noise_multiplier > 0 with FedNH needs "
                              "fednh.learn_scale=false: Opacus has no per-sample gradient for "
                              "a layer that holds buffers, as its scaled cosine head does")
        super().__init__(cfg, reference_state)
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.rho = cfg.section(FedNHConfig).rho
        self.prototypes = orthonormal_prototypes(num_classes, feature_dim,
                                                 torch.Generator().manual_seed(cfg.seed))

    def train_records(self) -> dict[str, ArrayRecord]:
        return {PROTOTYPES_RECORD: tensors_to_record({"prototypes": self.prototypes})}

    def decode_extra(self, content: RecordDict) -> ClassRows:
        return decode_class_means(required_record(content, MEANS_RECORD, "reply"),
                                  self.num_classes, self.feature_dim)

    def global_anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prototypes, torch.ones(self.num_classes, dtype=torch.bool)

    def server_step(self, server_round: int, weights: dict[str, torch.Tensor],
                    replies: list[ClientReply]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        rows: list[ClassRows] = [r.extra for r in replies]
        scaled = torch.stack([r.rows["scaled_means"] for r in rows])
        counts = torch.stack([r.counts for r in rows])  # type: ignore[misc]
        if self.pooling is not None:  # one vote a client: the robust rule over the holders'
            # directions, as one pooled client's (smoothing keeps only the direction)
            holders = counts > 0
            pooled = self.pooling.classes(F.normalize(scaled, dim=2), holders)
            scaled, counts = pooled[None], holders.any(dim=0)[None].long()
        self.prototypes, held = smoothed_prototypes(self.prototypes, scaled, counts, self.rho)
        return weights, {"prototype_classes": float(held.sum()),
                         "fednh_scale": weights[SCALE_KEY].item()}

    def evaluate_model(self, model: Backbone, data: TensorData,
                       device: torch.device) -> dict[str, float]:
        """The averaged model with the prototypes the clients get next."""
        cosine_model(model).set_prototypes(self.prototypes.to(device))
        return super().evaluate_model(model, data, device)

    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": self.prototypes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prototypes = checked_state(state, {"prototypes": self.prototypes})["prototypes"]


METHOD = Method("fednh", client_train, FedNHStrategy, section=FedNHConfig,
                extend_model=with_cosine_classifier)
