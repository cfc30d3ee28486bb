"""FedHPro: its client half (extraction + HPCL/HPAL training) and its server Strategy."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord

from fedhpro_flwr.algorithms.diagnostics import consistency_metric
from fedhpro_flwr.algorithms.extraction import ClassStatistics, extract_class_statistics
from fedhpro_flwr.algorithms.gradmatch import (
    Distance,
    LossAndGrad,
    Step,
    masked_class_mean,
)
from fedhpro_flwr.algorithms.hyperproto import (
    Init,
    Target,
    anchors,
    centers,
    init_hyperprototypes,
    match_hyperprototypes,
    matching_objective,
    nearest_classes,
    neighbour_agreement,
    row_matching_objective,
    separated,
)
from fedhpro_flwr.algorithms.losses import RunningClassMeans, hpal, hpcl
from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.prototypes import local_prototypes
from fedhpro_flwr.algorithms.recalibration import (
    RecalibrationSettings,
    Solver,
    Source,
    mean_class_gradients,
)
from fedhpro_flwr.algorithms.recalibration import (
    matching_objective as classifier_gradient_objective,
)
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
    """FedHPro's hyper-parameters (names follow ../shared/FEDHPRO.md)."""

    num_hyperprototypes: int = setting(5, ge=1)  # L per class
    tau: float = setting(0.05, gt=0.0)
    w_cl: float = setting(1.0, ge=0.0)  # HPCL weight
    w_al: float = setting(1.0, ge=0.0)  # HPAL weight
    margin: bool = setting(True)  # client-specific margin m_k in HPCL
    margin_momentum: float = setting(0.9, ge=0.0, le=1.0)  # running class-mean update
    batch_real: int = setting(100, ge=1)  # samples per class for gradient extraction
    repeat_num: int = setting(1, ge=1)
    init: Init = setting("normal")  # hyper-prototypes at start
    rounds_of_hp: int = setting(30, ge=0)  # matching steps per round; 0 = fixed anchors
    lr_hp: float = setting(0.1, gt=0.0)
    hp_step: Step = setting("sgd")  # see gradmatch.descend
    # after matching, move the class means of the hyper-prototypes onto the nearest mutually
    # orthogonal directions (hyperproto.separated; needs classes <= feature dim)
    hp_separate: bool = setting(False)
    # the gradients matched: w.r.t. the features (the paper's), w.r.t. each class's own
    # classifier row (centred directions, see hyperproto.row_matching_objective; C x d more
    # per client unless the whole classifier gradients travel) or w.r.t. the whole classifier
    hp_target: Target = setting("feature-grads")
    # the classes each class's hyper-prototypes are matched over (with the feature-grads
    # target and a distance other than scalar): itself and the classifier's
    # hp_softmax_classes - 1 highest-scoring others, so that a step costs C L K d instead of
    # C L C d, linear in the classes; 0: all classes, the paper's (so is any K >= C)
    hp_softmax_classes: int = setting(32, ge=0)
    # matching distance; "scalar" (the reference code's loop) applies to the hyper-prototypes
    # only, the recalibration then matches whole rows by cosine as that code does
    distance: Distance = setting("cosine")
    float16_upload: bool = setting(False)  # send the per-class gradients as float16
    recalibration: bool = setting(True)
    recal_features: int = setting(50, ge=1)  # M federated features per class
    recal_match_steps: int = setting(100, ge=0)
    recal_feature_lr: float = setting(0.1, gt=0.0)
    recal_epochs: int = setting(100, ge=1)
    recal_lr: float = setting(0.01, gt=0.0)
    recal_batch_size: int = setting(50, ge=1)
    # how the new classifier is trained: "sgd", the reference recipe (recal_epochs of minibatch
    # SGD), or "full-batch", the same schedule as one full-batch step per epoch (10x fewer
    # steps; the default: a tie with "sgd" in every default setting, benchmarks/recal-default)
    recal_solver: Solver = setting("full-batch")
    # with "full-batch": train on groups of this many classes at a time (a softmax over the
    # group, corrected as sampled softmax is), so that the cost grows linearly in the
    # classes; 0: every class in every step (so is any number >= the classes)
    recal_classes_per_step: int = setting(32, ge=0)
    # measure the classifier gradients after local training (at the trained extractor, with
    # the received classifier) instead of before it, as the paper and CReFF do
    recal_after_training: bool = setting(False)
    # move each class's federated features so that their mean is the class's mean feature,
    # read off the clients' classifier gradients (row c of dCE/dW over dCE/db_c)
    recal_recentre: bool = setting(False)
    # what the federated features come from: "gradients", matched to the clients' C x C x d
    # classifier gradients (the paper's), or "moments", drawn from the clients' per-class
    # feature means and spreads (C x d + C per client; no matching; cost linear in C; the
    # default: ahead of the paper's in every default setting, benchmarks/recal-default)
    recal_source: Source = setting("moments")
    # send the recalibrated classifier to the clients, as the reference code does; false:
    # evaluate with it but send the averaged one, as CReFF does (early on the recalibrated
    # classifier trails the averaged one, benchmarks/first-rounds)
    recal_to_clients: bool = setting(True)

    def __post_init__(self) -> None:
        for key in ("recal_classes_per_step", "hp_softmax_classes"):
            if getattr(self, key) == 1:
                raise ConfigError(f"config key 'fedhpro.{key}' = 1: a softmax needs at least 2 "
                                  f"classes; 0 takes every class")
        if self.recal_recentre and self.recal_source == "moments":
            raise ConfigError(
                "config key 'fedhpro.recal_recentre' = true re-centres the features matched to "
                "classifier gradients; with 'fedhpro.recal_source' = moments the features are "
                "drawn around the class means already and no classifier gradients travel: set "
                "one of the two")
        if self.hp_target == "classifier-grads" and not sends_classifier_grads(self):
            raise ConfigError(
                "config key 'fedhpro.hp_target' = classifier-grads matches the clients' "
                "classifier gradients, which travel only with 'fedhpro.recalibration' = true "
                "and 'fedhpro.recal_source' = gradients")
        if self.hp_target == "classifier-grads" and self.distance == "scalar":
            raise ConfigError("config key 'fedhpro.hp_target' = classifier-grads matches by "
                              "cosine or mse; 'fedhpro.distance' = scalar applies to the "
                              "feature gradients only")


def decode_hyperprototypes(record: ArrayRecord, num_classes: int, feature_dim: int,
                           per_class: int) -> torch.Tensor:
    """The server's hyper-prototypes as a client receives them, checked."""
    shape = (num_classes, per_class, feature_dim)
    return record_to_tensors(record, {"hp": (shape, "float")}, "hyper-prototypes")["hp"]


def sends_classifier_grads(hp_cfg: FedHProConfig) -> bool:
    return hp_cfg.recalibration and hp_cfg.recal_source == "gradients"


def sends_moments(hp_cfg: FedHProConfig) -> bool:
    return hp_cfg.recalibration and hp_cfg.recal_source == "moments"


def needs_own_rows(hp_cfg: FedHProConfig) -> bool:
    """Whether the server needs each class's own row of the classifier gradients (the
    row-grads target); the codec sends them alone only where the whole gradients do not
    carry them (`payload.encode_class_statistics`)."""
    return hp_cfg.hp_target == "row-grads"


def sends_feature_grads(hp_cfg: FedHProConfig) -> bool:
    """Whether the feature gradients travel: not when the server can rebuild them from bias
    gradients measured at the same model, i.e. with classifier gradients measured before
    training (see `payload.encode_class_statistics`)."""
    return not sends_classifier_grads(hp_cfg) or hp_cfg.recal_after_training


def upload_record(stats: ClassStatistics, hp_cfg: FedHProConfig) -> ArrayRecord:
    """What a client sends of its class statistics under these settings."""
    dtype = torch.float16 if hp_cfg.float16_upload else torch.float32
    return encode_class_statistics(stats, dtype, classifier=sends_classifier_grads(hp_cfg),
                                   feature_grads=sends_feature_grads(hp_cfg),
                                   moments=sends_moments(hp_cfg), own_rows=needs_own_rows(hp_cfg))


def client_train(task: ClientTask) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
    """Measure per-class gradients at the global model, then train with CE + HPCL + HPAL."""
    hp_cfg = task.cfg.section(FedHProConfig)
    model, data = task.model, task.data
    hp = decode_hyperprototypes(required_record(task.content, HP_RECORD), data.num_classes,
                                model.feature_dim, hp_cfg.num_hyperprototypes).to(task.device)
    stats = extract_class_statistics(
        model, data, hp_cfg.batch_real, hp_cfg.repeat_num, task.generator, task.device,
        classifier=sends_classifier_grads(hp_cfg),
    )
    class_anchors, class_centers = anchors(hp), centers(hp)
    head = (model.classifier.weight.detach().clone(), model.classifier.bias.detach().clone())
    assert stats.feature_means is not None
    running = RunningClassMeans(stats.feature_means.to(task.device),
                                stats.present.to(task.device), hp_cfg.margin_momentum)
    margin_sum = torch.zeros((), device=task.device)  # read once, after training
    batches = 0

    def regulariser(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal batches
        margin: float | torch.Tensor = 0.0
        if hp_cfg.margin:
            running.update(z, y)
            margin = running.margin()
            margin_sum.add_(margin)
            batches += 1
        zh = F.normalize(z, dim=1)
        return (hp_cfg.w_cl * hpcl(zh, y, class_anchors, hp_cfg.tau, margin)
                + hp_cfg.w_al * hpal(zh, y, class_centers))

    metrics = train_epochs(model, data, task.cfg.train, task.generator, task.device, regulariser)
    metrics["margin"] = margin_sum.item() / batches if batches else 0.0
    if hp_cfg.recalibration and hp_cfg.recal_after_training:
        # the trained extractor's features, seen through the classifier the server matches at
        after = extract_class_statistics(model, data, hp_cfg.batch_real, hp_cfg.repeat_num,
                                         task.generator, task.device, head=head,
                                         classifier=sends_classifier_grads(hp_cfg))
        stats = replace(stats, weight_grads=after.weight_grads, bias_grads=after.bias_grads,
                        feature_means=after.feature_means, feature_vars=after.feature_vars)
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
        if hp_cfg.hp_separate and num_classes > feature_dim:
            raise ConfigError(f"config key 'fedhpro.hp_separate' = true needs classes <= "
                              f"feature dim: {num_classes} classes, {feature_dim} dims")
        generator = torch.Generator().manual_seed(cfg.seed)
        hyperprototypes = init_hyperprototypes(
            num_classes, hp_cfg.num_hyperprototypes, feature_dim, generator,
            hp_cfg.init,
        )
        settings = RecalibrationSettings(
            hp_cfg.recal_match_steps, hp_cfg.recal_feature_lr, hp_cfg.recal_epochs,
            hp_cfg.recal_lr, hp_cfg.recal_batch_size,
            "cosine" if hp_cfg.distance == "scalar" else hp_cfg.distance,
            recentre=hp_cfg.recal_recentre, solver=hp_cfg.recal_solver,
            source=hp_cfg.recal_source, classes_per_step=hp_cfg.recal_classes_per_step,
        )
        super().__init__(cfg, reference_state, num_classes, feature_dim, hp_cfg.recal_features,
                         settings, generator, classifier_gradients=sends_classifier_grads(hp_cfg),
                         feature_gradients=sends_feature_grads(hp_cfg),
                         moments=sends_moments(hp_cfg), own_rows=needs_own_rows(hp_cfg))
        self.hyperprototypes = hyperprototypes
        # this round's classifiers, once a recalibration has run: the averaged one and the
        # one re-trained on federated features, which evaluation uses
        self.aggregated_head: dict[str, torch.Tensor] | None = None
        self.recalibrated_head: dict[str, torch.Tensor] | None = None

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
            self.recalibrated_head = {"weight": result.weight, "bias": result.bias}
            if hp_cfg.recal_to_clients:
                weights = {**weights, w_key: result.weight, b_key: result.bias}
            diagnostics |= result.diagnostics()

        # matched at the classifier the clients train with next
        weight, bias = weights[w_key].detach(), weights[b_key].detach()
        objective = self.matching_objective(hp_cfg, stats, weight, bias, diagnostics)
        match = match_hyperprototypes(self.hyperprototypes, objective, hp_cfg.rounds_of_hp,
                                      hp_cfg.lr_hp, hp_cfg.hp_step)
        self.hyperprototypes = match.hyperprototypes
        if hp_cfg.hp_separate:
            self.hyperprototypes = separated(self.hyperprototypes, present)
        self.head = {"weight": weights[w_key].clone(), "bias": weights[b_key].clone()}
        diagnostics |= {"hp_match_loss_before": match.loss_before,
                        "hp_match_loss_after": match.loss_after,
                        "hp_movement": match.movement,
                        "margin": mean_metric(replies, "margin")}
        return weights, diagnostics

    def matching_objective(self, hp_cfg: FedHProConfig, stats: list[ClassStatistics],
                           weight: torch.Tensor, bias: torch.Tensor,
                           diagnostics: dict[str, float]) -> LossAndGrad:
        """What the hyper-prototypes descend this round (`fedhpro.hp_target`): the distance
        of the gradients they induce at the new classifier to the clients' mean ones."""
        if hp_cfg.hp_target == "classifier-grads":
            target, present = mean_class_gradients(stats)
            return classifier_gradient_objective(weight, bias, target, present,
                                                 hp_cfg.distance)
        held = torch.stack([s.present for s in stats])

        def mean_of(values: list[torch.Tensor]) -> torch.Tensor:
            return masked_class_mean(torch.stack(values), held)[0]

        present = held.any(dim=0)
        if hp_cfg.hp_target == "row-grads":
            own_rows = mean_of([s.own_row_grads for s in stats])
            return row_matching_objective(weight, bias, own_rows, present)
        feature_target = mean_of([s.feature_grads for s in stats])
        neighbours = None
        if 0 < hp_cfg.hp_softmax_classes < self.num_classes and hp_cfg.distance != "scalar":
            neighbours = nearest_classes(self.hyperprototypes, weight, bias,
                                         hp_cfg.hp_softmax_classes)
            diagnostics["hp_neighbour_cosine"] = neighbour_agreement(
                self.hyperprototypes, weight, bias, neighbours)
        return matching_objective(weight, bias, feature_target, present, hp_cfg.distance,
                                  neighbours)

    def evaluate_model(self, model: Backbone, data: TensorData,
                       device: torch.device) -> dict[str, float]:
        """With the recalibrated classifier, whichever one the clients were sent; also the
        accuracy with the averaged one: whether recalibration paid this round."""
        if self.aggregated_head is None or self.recalibrated_head is None:
            return super().evaluate_model(model, data, device)
        scores = super().evaluate_model(with_classifier(model, self.recalibrated_head), data,
                                        device)
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
