"""Classifier recalibration with federated features (CReFF, Shang et al., IJCAI 2022).

The server keeps M learnable "federated features" per class. Each round it moves them so
that the classifier gradients they induce match the clients' mean classifier gradients, then
trains a fresh linear layer on them. The features are balanced across classes by
construction, which is what corrects a classifier biased by skewed client data.

The clients' classifier gradients are C x C x d each, and matching against them costs C^2
per step. The `moments` source replaces both by each class's feature mean and spread (C x d
and C per client): the server draws the features from the pooled Gaussian of each class and
trains the same fresh linear layer on them, without matching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fedhpro_flwr.algorithms.extraction import ClassStatistics
from fedhpro_flwr.algorithms.gradmatch import (
    ClassGradients,
    Distance,
    LossAndGrad,
    cosine_rows,
    descend,
    distance_and_grad,
    masked_class_mean,
    prepared_target,
)
from fedhpro_flwr.algorithms.robust import Pooling

# how the new classifier is trained on the federated features: by the reference recipe's
# minibatch SGD, or by the same schedule as one full-batch step per epoch
Solver = Literal["sgd", "full-batch"]
# what the federated features are made from: matched to the clients' classifier gradients,
# or drawn from the clients' per-class feature moments
Source = Literal["gradients", "moments"]


@dataclass(frozen=True)
class RecalibrationResult:
    """The matched features, the retrained classifier and how matching went."""

    features: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    match_loss_before: float | None  # None: drawn, not matched
    match_loss_after: float | None

    def diagnostics(self) -> dict[str, float]:
        if self.match_loss_before is None or self.match_loss_after is None:
            return {}
        return {"recal_match_loss_before": self.match_loss_before,
                "recal_match_loss_after": self.match_loss_after}


def matching_objective(
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: ClassGradients,
    present: torch.Tensor,
    distance: Distance,
) -> LossAndGrad:
    """The matching loss of the (C, M, d) features and its gradient, in closed form.

    Loss: sum over present classes of D(weight grads) + D(bias grads) against the target,
    where class c's features induce ``G_c = R_c^T V_c / M`` and ``g_c = R_c^T 1 / M`` with
    ``R_c = softmax(V_c W^T + b) - e_c``. Back through those products and the softmax by
    hand, with what depends only on the target (its unit rows, the mask of present classes)
    computed once: each of the hundred dependent steps is then about thirty small tensor
    operations and no host synchronisation, where autograd's graph and boolean indexing
    cost more than the arithmetic on the server's small problems.
    """
    assert target.weight is not None and target.bias is not None
    target_w = prepared_target(target.weight, present, distance)
    target_b = prepared_target(target.bias, present, distance)
    num_classes = weight.shape[0]
    eye = torch.eye(num_classes, dtype=weight.dtype)[:, :, None]
    bias_column = bias[:, None]
    rows = cosine_rows(target.weight, present) + cosine_rows(target.bias, present)

    def loss_and_grad(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # logits laid out (class of the features, output, sample): a softmax over the middle
        # axis is several times faster on the CPU than over a short last one
        scale = 1.0 / features.shape[1]
        features_t = features.transpose(1, 2)
        probs = torch.matmul(weight, features_t).add_(bias_column).softmax(dim=1)  # (C, C, M)
        residual = probs - eye
        weight_grads = torch.bmm(residual, features).mul_(scale)  # (C, C, d)
        bias_grads = residual.sum(dim=2).mul_(scale)  # (C, C)
        loss_w, d_weight = distance_and_grad(weight_grads, target_w, present, distance)
        loss_b, d_bias = distance_and_grad(bias_grads, target_b, present, distance)
        d_residual = torch.baddbmm(d_bias[:, :, None], d_weight, features_t, alpha=scale,
                                   beta=scale)
        d_logits = probs * (d_residual - (d_residual * probs).sum(dim=1, keepdim=True))
        d_features = torch.baddbmm(torch.matmul(d_logits.transpose(1, 2), weight),
                                   residual.transpose(1, 2), d_weight, alpha=scale)
        loss = loss_w + loss_b + (rows if distance == "cosine" else 0)
        return loss, d_features

    return loss_and_grad


def feature_matching(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: ClassGradients,
    present: torch.Tensor,
    distance: Distance,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The matching loss and its gradient at `features` (see `matching_objective`)."""
    return matching_objective(weight, bias, target, present, distance)(features)


def fresh_linear(num_classes: int, dim: int, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) drawn as ``nn.Linear`` initialises them, from our generator."""
    bound = dim**-0.5
    weight = (torch.rand(num_classes, dim, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(num_classes, generator=generator) * 2 - 1) * bound
    return weight.to(dtype), bias.to(dtype)


def train_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A freshly initialised linear layer trained by minibatch SGD on CE(features, labels).

    The CE gradient of a linear layer is ``(softmax - onehot)^T x / B``; writing it out
    (fused into in-place matrix products, each epoch's shuffle gathered once) instead of
    calling autograd makes the thousand small steps several times faster.
    """
    weight, bias = fresh_linear(num_classes, features.shape[1], generator, features.dtype)
    # logits laid out (classes, samples): a softmax over the first axis is several times
    # faster on the CPU than over a short last one
    onehot_t = F.one_hot(labels, num_classes).to(features.dtype).T
    bias_column = bias[:, None]  # a view: follows the in-place updates of `bias`
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        shuffled, targets = features[order], onehot_t[:, order]
        for start in range(0, len(labels), batch_size):
            x = shuffled[start : start + batch_size]
            residual = torch.addmm(bias_column, weight, x.T).softmax(dim=0)
            residual -= targets[:, start : start + batch_size]
            weight.addmm_(residual, x, alpha=-lr / len(x))
            bias.sub_(residual.sum(dim=1), alpha=lr / len(x))
    return weight, bias


def train_linear_full_batch(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`train_linear`'s schedule with one full-batch gradient step per epoch.

    An epoch of ``n / batch_size`` minibatch steps at `lr` moves the layer, to first order in
    `lr`, as one full-batch step at ``lr * n / batch_size``: the same path without the
    shuffling noise, in `epochs` dependent steps instead of ``epochs * n / batch_size`` (100
    instead of 1,000 for FedHPro's defaults). Same initialisation draws as `train_linear`.
    """
    weight, bias = fresh_linear(num_classes, features.shape[1], generator, features.dtype)
    onehot_t = F.one_hot(labels, num_classes).to(features.dtype).T
    bias_column = bias[:, None]
    features_t = features.T
    step = lr * math.ceil(len(labels) / batch_size) / len(labels)  # per-sample-sum step
    for _ in range(epochs):
        residual = torch.addmm(bias_column, weight, features_t).softmax(dim=0).sub_(onehot_t)
        weight.addmm_(residual, features, alpha=-step)
        bias.sub_(residual.sum(dim=1), alpha=step)
    return weight, bias


def train_linear_class_groups(
    features: torch.Tensor,
    classes: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    classes_per_step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`train_linear_full_batch` with each epoch's step split over random groups of
    `classes_per_step` of the `classes` (C,) bool (the last group holds the rest): a step
    trains the group's rows on the group's (C, M, d) `features`, its softmax over the group's
    classes alone.

    A step costs ``S M S d`` for groups of S classes, an epoch ``C M S d``: linear in the
    classes where the full softmax is quadratic. A sample meets only its group's classes, so
    each other class's logit is raised by ``log((C - 1) / (S - 1))``, one over the chance
    that it shares the group (sampled softmax's correction): the group's normaliser then
    estimates the full softmax's, and the rows are pushed apart as strongly as by the full
    softmax on average. With every class in one group this is `train_linear_full_batch`.
    """
    num_classes, per_class, dim = features.shape
    weight, bias = fresh_linear(num_classes, dim, generator, features.dtype)
    trained = classes.nonzero().squeeze(1)
    for _ in range(epochs):
        for group in trained[torch.randperm(len(trained), generator=generator)].split(
                classes_per_step):
            size = len(group)
            x = features[group].flatten(0, 1)  # (size * M, d), M rows per class
            own = torch.eye(size, dtype=x.dtype).repeat_interleave(per_class, dim=1)
            raised = math.log((len(trained) - 1) / max(size - 1, 1))
            rows, offsets = weight[group], bias[group]  # copies, written back below
            logits = torch.addmm(offsets[:, None], rows, x.T)
            residual = logits.add_(own, alpha=-raised).softmax(dim=0).sub_(own)
            step = lr * math.ceil(len(x) / batch_size) / len(x)
            weight[group] = rows.addmm_(residual, x, alpha=-step)
            bias[group] = offsets.sub_(residual.sum(dim=1), alpha=step)
    return weight, bias


def recalibrate(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: ClassGradients,
    present: torch.Tensor,
    *,
    match_steps: int,
    feature_lr: float,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    distance: Distance = "cosine",
    train_classes: torch.Tensor | None = None,
    solver: Solver = "sgd",
    classes_per_step: int = 0,
) -> RecalibrationResult:
    """Match the federated features to the target gradients, then retrain the classifier.

    Args:
        features: (C, M, d) federated features.
        weight, bias: the aggregated global classifier, held fixed while matching.
        target: mean over clients of their per-class classifier gradients.
        present: (C,) bool, classes with a target this round.
        train_classes: (C,) bool, classes whose features train the new classifier
            (default: `present`).
        solver: `train_linear` ("sgd") or `train_linear_full_batch` ("full-batch").
        classes_per_step: see `classifier_on`.
    """
    weight, bias = weight.detach(), bias.detach()
    matched, before, after = descend(
        features, matching_objective(weight, bias, target, present, distance), match_steps,
        feature_lr,
    )

    classes = present if train_classes is None else train_classes
    new_weight, new_bias = classifier_on(matched, classes, solver, epochs, lr, batch_size,
                                         generator, classes_per_step)
    return RecalibrationResult(matched, new_weight, new_bias, before, after)


def classifier_on(features: torch.Tensor, classes: torch.Tensor, solver: Solver, epochs: int,
                  lr: float, batch_size: int, generator: torch.Generator,
                  classes_per_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh linear layer trained on the (C, M, d) features of the `classes` (C,) bool
    (`classes_per_step`: with "full-batch", train on groups of that many classes at a time,
    `train_linear_class_groups`, where more are trained; 0: all in every step)."""
    if solver == "full-batch" and 0 < classes_per_step < int(classes.sum()):
        return train_linear_class_groups(features, classes, epochs, lr, batch_size, generator,
                                         classes_per_step)
    num_classes, per_class, _ = features.shape
    labels = torch.arange(num_classes).repeat_interleave(per_class).view(num_classes, per_class)
    train = train_linear if solver == "sgd" else train_linear_full_batch
    return train(features[classes].flatten(0, 1), labels[classes].flatten(), num_classes,
                 epochs, lr, batch_size, generator)


def mean_class_gradients(stats: list[ClassStatistics], pooling: Pooling | None = None
                         ) -> tuple[ClassGradients, torch.Tensor]:
    """The clients' per-class CE gradients (feature, classifier weight and bias), each class
    averaged over the clients holding it (or pooled by `pooling`), and which classes any
    client holds (C,)."""
    if any(s.weight_grads is None or s.bias_grads is None for s in stats):
        raise ValueError("recalibration needs the classifier gradients of every reply")
    held = torch.stack([s.present for s in stats])

    def pooled(values: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(values)
        if pooling is None:
            return masked_class_mean(stacked, held)[0]
        return pooling.classes(stacked, held)

    target = ClassGradients(pooled([s.feature_grads for s in stats]),
                            weight=pooled([s.weight_grads for s in stats]),
                            bias=pooled([s.bias_grads for s in stats]))
    return target, held.any(dim=0)


def pooled_moments(stats: list[ClassStatistics], pooling: Pooling | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each class's feature mean and variance over all clients holding it: (C, d), (C,)
    and which classes any client holds (C,).

    Means are weighted by the clients' class counts; the variance adds the spread of the
    clients' means around the pooled one to their own spreads (the law of total variance),
    per dimension. With `pooling`, the same two steps with the robust rule in place of the
    count-weighted mean, one vote a holder."""
    if any(s.feature_means is None or s.feature_vars is None for s in stats):
        raise ValueError("moment recalibration needs the feature moments of every reply")
    counts = torch.stack([s.counts * s.present for s in stats]).to(torch.float32)  # (K, C)
    means = torch.stack([s.feature_means for s in stats])  # (K, C, d)
    variances = torch.stack([s.feature_vars for s in stats])  # (K, C)
    totals = counts.sum(dim=0)
    weights = counts / totals.clamp(min=1)

    def pooled(values: torch.Tensor) -> torch.Tensor:  # (K, C) or (K, C, d) -> (C, ...)
        if pooling is not None:
            return pooling.classes(values, counts > 0)
        return ((weights if values.dim() == 2 else weights[..., None]) * values).sum(dim=0)

    mean = pooled(means)
    between = ((means - mean) ** 2).mean(dim=2)
    return mean, pooled(variances + between), totals > 0


def drawn_features(features: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
                   classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`features` with the M rows of each class in `classes` drawn anew from N(mean, var I)."""
    noise = torch.randn(features.shape, generator=generator)
    drawn = means[:, None, :] + variances.sqrt()[:, None, None] * noise
    return torch.where(classes[:, None, None], drawn, features)


@dataclass(frozen=True)
class RecalibrationSettings:
    """The knobs of `recalibrate` that a method's config sets."""

    match_steps: int
    feature_lr: float
    epochs: int
    lr: float
    batch_size: int
    distance: Distance = "cosine"
    solver: Solver = "sgd"
    source: Source = "gradients"
    classes_per_step: int = 0  # see `classifier_on`
    pooling: Pooling | None = None  # the clients' statistics pooled robustly; None: averaged


class FederatedFeatures:
    """The server's federated features and the classes seen so far: CReFF's state.

    Each call to `recalibrate` averages the clients' classifier gradients per class (over
    the clients holding it), matches the features to them and returns a retrained classifier.
    """

    def __init__(self, num_classes: int, per_class: int, dim: int, generator: torch.Generator):
        self.features = torch.randn(num_classes, per_class, dim, generator=generator)
        self.seen = torch.zeros(num_classes, dtype=torch.bool)

    def recalibrate(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        stats: list[ClassStatistics],
        settings: RecalibrationSettings,
        generator: torch.Generator,
    ) -> RecalibrationResult:
        """Match against `weight`, `bias` (held fixed), or draw from the moments (see
        `RecalibrationSettings.source`); the features keep the result."""
        if settings.source == "moments":
            return self.from_moments(stats, settings, generator)
        target, present = mean_class_gradients(stats, settings.pooling)
        self.seen |= present
        result = recalibrate(
            self.features, weight, bias, target, present,
            match_steps=settings.match_steps, feature_lr=settings.feature_lr,
            epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
            generator=generator, distance=settings.distance, train_classes=self.seen,
            solver=settings.solver, classes_per_step=settings.classes_per_step,
        )
        self.features = result.features
        return result

    def from_moments(self, stats: list[ClassStatistics], settings: RecalibrationSettings,
                     generator: torch.Generator) -> RecalibrationResult:
        """Features drawn from this round's pooled class moments (classes absent this round
        keep theirs), and a fresh classifier trained on every class seen so far."""
        means, variances, present = pooled_moments(stats, settings.pooling)
        self.features = drawn_features(self.features, means, variances, present, generator)
        self.seen |= present
        new_weight, new_bias = classifier_on(self.features, self.seen, settings.solver,
                                             settings.epochs, settings.lr, settings.batch_size,
                                             generator, settings.classes_per_step)
        return RecalibrationResult(self.features, new_weight, new_bias, None, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"features": self.features, "seen": self.seen}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.features = state["features"].clone()
        self.seen = state["seen"].clone()
