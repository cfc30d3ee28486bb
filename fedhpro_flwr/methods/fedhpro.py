"""FedHPro: its client half (extraction + HPCL/HPAL training) and its server Strategy."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord

from fedhpro_flwr.algorithms.diagnostics import consistency_metric
from fedhpro_flwr.algorithms.extraction import (
    ClassStatistics,
    extract_class_statistics,
    private_class_statistics,
)
from fedhpro_flwr.algorithms.gradmatch import Distance, LossAndGrad, masked_class_mean
from fedhpro_flwr.algorithms.hyperproto import (
    anchors,
    centers,
    init_hyperprototypes,
    match_hyperprototypes,
    matching_objective,
    nearest_classes,
    neighbour_agreement,
)
from fedhpro_flwr.algorithms.losses import RunningClassMeans, hpal, hpcl
from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.prototypes import local_prototypes
from fedhpro_flwr.algorithms.recalibration import RecalibrationSettings, Solver, Source
from fedhpro_flwr.algorithms.training import evaluate, train_epochs
from fedhpro_flwr.config import ConfigError, ExperimentConfig, setting
from fedhpro_flwr.data.federated import TensorData
from fedhpro_flwr.methods.base import ClientTask, Method
from fedhpro_flwr.methods.payload import (
    encode_class_statistics,
    record_to_tensors,
    required_record,
    tensors_to_record,
)
from fedhpro_flwr.methods.recalibrating import STATS_RECORD, RecalibratingStrategy
from fedhpro_flwr.methods.strategy import ClientReply, checked_state, mean_metric

HP_RECORD = "hyperprototypes"


@dataclass(frozen=True)
class FedHProConfig:
    """FedHPro's hyper-parameters (names follow the paper and its reference code)."""

    num_hyperprototypes: int = setting(5, ge=1)  # L per class
    tau: float = setting(0.05, gt=0.0)
    w_cl: float = setting(1.0, ge=0.0)  # HPCL weight
    w_al: float = setting(1.0, ge=0.0)  # HPAL weight
    margin: bool = setting(True)  # client-specific margin m_k in HPCL
    margin_momentum: float = setting(0.9, ge=0.0, le=1.0)  # running class-mean update
    batch_real: int = setting(100, ge=1)  # samples per class for gradient extraction
    repeat_num: int = setting(1, ge=1)
    rounds_of_hp: int = setting(30, ge=0)  # matching steps per round; 0 = fixed anchors
    lr_hp: float = setting(0.1, gt=0.0)
    # the classes each class's hyper-prototypes are matched over: itself and the classifier's
    # hp_softmax_classes - 1 highest-scoring others, so that a step costs C L K d instead of
    # C L C d, linear in the classes; 0: all classes, the paper's (so is any K >= C)
    hp_softmax_classes: int = setting(32, ge=0)
    distance: Distance = setting("cosine")  # matching distance (the paper's; also mse)
    float16_upload: bool = setting(False)  # send the per-class statistics as float16
    recalibration: bool = setting(True)
    recal_features: int = setting(50, ge=1)  # M federated features per class
    recal_match_steps: int = setting(100, ge=0)
    recal_feature_lr: float = setting(0.1, gt=0.0)
    recal_epochs: int = setting(100, ge=1)
    recal_lr: float = setting(0.01, gt=0.0)
    recal_batch_size: int = setting(50, ge=1)
    # how the new classifier is trained: "sgd", the reference recipe (recal_epochs of minibatch
    # SGD), or "full-batch", the same schedule as one full-batch step per epoch (10x fewer
    # steps; the default: a tie with "sgd" in every default setting, as measured)
    recal_solver: Solver = setting("full-batch")
    # with "full-batch": train on groups of this many classes at a time (a softmax over the
    # group, corrected as sampled softmax is), so that the cost grows linearly in the
    # classes; 0: every class in every step (so is any number >= the classes)
    recal_classes_per_step: int = setting(32, ge=0)
    # what the federated features come from: "gradients", matched to the clients' C x C x d
    # classifier gradients (the paper's), or "moments", drawn from the clients' per-class
    # feature means and spreads (C x d + C per client; no matching; cost linear in C; the
    # default: ahead of the paper's in every default setting, as measured)
    recal_source: Source = setting("moments")

    def __post_init__(self) -> None:
        for key in ("recal_classes_per_step", "hp_softmax_classes"):
            if getattr(self, key) == 1:
                raise ConfigError(f"config key 'fedhpro.{key}' = 1: a softmax needs at least 2 "
                                  f"classes; 0 takes every class")


def decode_hyperprototypes(record: ArrayRecord, num_classes: int, feature_dim: int,
                           per_class: int) -> torch.Tensor:
    """The server's hyper-prototypes as a client receives them, checked."""
    shape = (num_classes, per_class, feature_dim)
    return record_to_tensors(record, {"hp": (shape, "float")}, "hyper-prototypes")["hp"]


def sends_classifier_grads(hp_cfg: FedHProConfig) -> bool:
    return hp_cfg.recalibration and hp_cfg.recal_source == "gradients"


def sends_moments(hp_cfg: FedHProConfig) -> bool:
    return hp_cfg.recalibration and hp_cfg.recal_source == "moments"


def sends_feature_grads(hp_cfg: FedHProConfig) -> bool:
    """Whether the feature gradients travel: not when the server can rebuild them from the
    bias gradients measured at the same model (see `payload.encode_class_statistics`)."""
    return not sends_classifier_grads(hp_cfg)


def upload_record(stats: ClassStatistics, hp_cfg: FedHProConfig) -> ArrayRecord:
    """What a client sends of its class statistics under these settings."""
    dtype = torch.float16 if hp_cfg.float16_upload else torch.float32
    return encode_class_statistics(stats, dtype, classifier=sends_classifier_grads(hp_cfg),
                                   feature_grads=sends_feature_grads(hp_cfg),
                                   moments=sends_moments(hp_cfg))


def client_train(task: ClientTask) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
    """Measure per-class gradients at the global model, then train with CE + HPCL + HPAL."""
    hp_cfg = task.cfg.section(FedHProConfig)
    model, data = task.model, task.data
    hp = decode_hyperprototypes(required_record(task.content, HP_RECORD), data.num_classes,
                                model.feature_dim, hp_cfg.num_hyperprototypes).to(task.device)
    classifier = sends_classifier_grads(hp_cfg)
    stats = (extract_class_statistics(model, data, hp_cfg.batch_real, hp_cfg.repeat_num,
                                      task.generator, task.device, classifier=classifier)
             if task.privacy is None else
             private_class_statistics(model, data, task.privacy, task.device,
                                      classifier=classifier))
    class_anchors, class_centers = anchors(hp), centers(hp)
    assert stats.feature_means is not None
    running = RunningClassMeans(stats.feature_means.to(task.device),
                                stats.present.to(task.device), hp_cfg.margin_momentum)
    margin_sum = torch.zeros((), device=task.device)  # read once, after training
    batches = 0

    def regulariser(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal batches
        margin: float | torch.Tensor = 0.0
        if hp_cfg.margin:
            if task.privacy is None:  # DP-SGD: a record's loss may depend on it alone, so
                running.update(z, y)  # the margin stays at the released means' value
            margin = running.margin()
            margin_sum.add_(margin)
            batches += 1
        zh = F.normalize(z, dim=1)
        return (hp_cfg.w_cl * hpcl(zh, y, class_anchors, hp_cfg.tau, margin)
                + hp_cfg.w_al * hpal(zh, y, class_centers))

    metrics = train_epochs(model, data, task.cfg.train, task.generator, task.device, regulariser,
                           privacy=task.privacy)
    metrics["margin"] = margin_sum.item() / batches if batches else 0.0
    if task.cfg.diagnostics.consistency:
        protos, counts = local_prototypes(model, data, task.device)
        metrics |= consistency_metric(protos, counts > 0, class_anchors,
                                      torch.ones(data.num_classes, dtype=torch.bool))
    return {STATS_RECORD: upload_record(stats, hp_cfg)}, metrics


def with_classifier(model: Backbone, head: Mapping[str, torch.Tensor]) -> Backbone:
    """A copy of `model` with this classifier."""
    copied = copy.deepcopy(model)
    copied.classifier.load_state_dict(head)
    return copied


class FedHProStrategy(RecalibratingStrategy):
    """Keeps the hyper-prototypes (and recalibration features) and updates them each round."""

    def __init__(self, cfg: ExperimentConfig, reference_state: Mapping[str, torch.Tensor],
                 num_classes: int, feature_dim: int):
        hp_cfg = cfg.section(FedHProConfig)
        generator = torch.Generator().manual_seed(cfg.seed)
        hyperprototypes = init_hyperprototypes(num_classes, hp_cfg.num_hyperprototypes,
                                               feature_dim, generator)
        settings = RecalibrationSettings(
            hp_cfg.recal_match_steps, hp_cfg.recal_feature_lr, hp_cfg.recal_epochs,
            hp_cfg.recal_lr, hp_cfg.recal_batch_size, hp_cfg.distance,
            solver=hp_cfg.recal_solver, source=hp_cfg.recal_source,
            classes_per_step=hp_cfg.recal_classes_per_step,
        )
        super().__init__(cfg, reference_state, num_classes, feature_dim, hp_cfg.recal_features,
                         settings, generator, classifier_gradients=sends_classifier_grads(hp_cfg),
                         feature_gradients=sends_feature_grads(hp_cfg),
                         moments=sends_moments(hp_cfg))
        self.hyperprototypes = hyperprototypes
        # this round's averaged classifier, once a recalibration has replaced it: evaluation
        # also reports its accuracy
        self.aggregated_head: dict[str, torch.Tensor] | None = None

    def train_records(self) -> dict[str, ArrayRecord]:
        return {HP_RECORD: tensors_to_record({"hp": self.hyperprototypes})}

    def global_anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return anchors(self.hyperprototypes), torch.ones(self.num_classes, dtype=torch.bool)

    def server_step(self, server_round: int, weights: dict[str, torch.Tensor],
                    replies: list[ClientReply]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        hp_cfg = self.cfg.section(FedHProConfig)
        stats: list[ClassStatistics] = [r.extra for r in replies]
        present = torch.stack([s.present for s in stats]).any(dim=0)
        diagnostics: dict[str, float] = {"classes_reported": float(present.sum())}
        w_key, b_key = "classifier.weight", "classifier.bias"

        if hp_cfg.recalibration:
            # matched at the classifier the gradients were measured at, as the authors' code
            result = self.recalibrate(replies)
            self.aggregated_head = {"weight": weights[w_key], "bias": weights[b_key]}
            weights = {**weights, w_key: result.weight, b_key: result.bias}
            diagnostics |= result.diagnostics()

        # matched at the classifier the clients train with next
        weight, bias = weights[w_key].detach(), weights[b_key].detach()
        objective = self.matching_objective(hp_cfg, stats, weight, bias, diagnostics)
        match = match_hyperprototypes(self.hyperprototypes, objective, hp_cfg.rounds_of_hp,
                                      hp_cfg.lr_hp)
        self.hyperprototypes = match.hyperprototypes
        self.head = {"weight": weights[w_key].clone(), "bias": weights[b_key].clone()}
        diagnostics |= {"hp_match_loss_before": match.loss_before,
                        "hp_match_loss_after": match.loss_after,
                        "hp_movement": match.movement,
                        "margin": mean_metric(replies, "margin")}
        return weights, diagnostics

    def matching_objective(self, hp_cfg: FedHProConfig, stats: list[ClassStatistics],
                           weight: torch.Tensor, bias: torch.Tensor,
                           diagnostics: dict[str, float]) -> LossAndGrad:
        """What the hyper-prototypes descend this round: the distance of the feature gradients
        they induce at the new classifier to the clients' mean ones."""
        held = torch.stack([s.present for s in stats])
        grads = torch.stack([s.feature_grads for s in stats])
        target = self.pooled_classes(grads, held, masked_class_mean(grads, held)[0])
        neighbours = None
        if 0 < hp_cfg.hp_softmax_classes < self.num_classes:
            neighbours = nearest_classes(self.hyperprototypes, weight, bias,
                                         hp_cfg.hp_softmax_classes)
            diagnostics["hp_neighbour_cosine"] = neighbour_agreement(
                self.hyperprototypes, weight, bias, neighbours)
        return matching_objective(weight, bias, target, held.any(dim=0), hp_cfg.distance,
                                  neighbours)

    def evaluate_model(self, model: Backbone, data: TensorData,
                       device: torch.device) -> dict[str, float]:
        """With the recalibrated classifier the clients were sent; also the accuracy with the
        averaged one: whether recalibration paid this round."""
        scores = super().evaluate_model(model, data, device)
        if self.aggregated_head is None:
            return scores
        averaged = with_classifier(model, self.aggregated_head)
        scores["aggregated_head_accuracy"] = evaluate(averaged, data, device)[1]
        return scores

    def state_dict(self) -> dict[str, Any]:
        return {"hyperprototypes": self.hyperprototypes, **super().state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.hyperprototypes = checked_state(
            state, {"hyperprototypes": self.hyperprototypes})["hyperprototypes"]


METHOD = Method("fedhpro", client_train, FedHProStrategy, section=FedHProConfig,
                personal_weights=("classifier.weight", "classifier.bias"))
