"""Classifier recalibration with federated features (CReFF, Shang et al., IJCAI 2022).

The server keeps M learnable "federated features" per class. Each round it moves them so
that the classifier gradients they induce match the clients' mean classifier gradients, then
trains a fresh linear layer on them. The features are balanced across classes by
construction, which is what corrects a classifier biased by skewed client data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedhpro_flwr.algorithms.extraction import ClassStatistics
from fedhpro_flwr.algorithms.gradmatch import (
    ClassGradients,
    Distance,
    descend,
    distance_and_grad,
    masked_class_mean,
    softmax_residual,
)


@dataclass(frozen=True)
class RecalibrationResult:
    """The matched features, the retrained classifier and how matching went."""

    features: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    match_loss_before: float
    match_loss_after: float


def feature_matching(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: ClassGradients,
    present: torch.Tensor,
    distance: Distance,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The matching loss and its gradient w.r.t. the (C, M, d) features, in closed form.

    Loss: sum over present classes of D(weight grads) + D(bias grads) against the target,
    where class c's features induce ``G_c = R_c^T V_c / M`` and ``g_c = R_c^T 1 / M`` with
    ``R_c = softmax(V_c W^T + b) - e_c``. Back through those products and the softmax by
    hand: a few batched matrix products per step instead of autograd's graph, which on the
    server's small problems cost more than the arithmetic.
    """
    per_class = features.shape[1]
    probs, residual = softmax_residual(features, weight, bias)  # (C, M, C)
    weight_grads = residual.transpose(1, 2) @ features / per_class  # (C, C, d)
    bias_grads = residual.sum(dim=1) / per_class  # (C, C)
    assert target.weight is not None and target.bias is not None
    loss_w, d_weight = distance_and_grad(weight_grads[present], target.weight[present], distance)
    loss_b, d_bias = distance_and_grad(bias_grads[present], target.bias[present], distance)
    d_weight_grads = torch.zeros_like(weight_grads).index_put_((present,), d_weight)
    d_bias_grads = torch.zeros_like(bias_grads).index_put_((present,), d_bias)
    d_residual = (features @ d_weight_grads.transpose(1, 2) + d_bias_grads[:, None]) / per_class
    d_logits = probs * (d_residual - (d_residual * probs).sum(dim=-1, keepdim=True))
    d_features = residual @ d_weight_grads / per_class + d_logits @ weight
    return loss_w + loss_b, d_features


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
    dim = features.shape[1]
    bound = dim**-0.5  # nn.Linear's default range, drawn from our generator
    weight = (torch.rand(num_classes, dim, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(num_classes, generator=generator) * 2 - 1) * bound
    onehot = F.one_hot(labels, num_classes).to(features.dtype)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        shuffled, targets = features[order], onehot[order]
        for start in range(0, len(labels), batch_size):
            x = shuffled[start : start + batch_size]
            residual = torch.addmm(bias, x, weight.T).softmax(dim=1)
            residual -= targets[start : start + batch_size]
            weight.addmm_(residual.T, x, alpha=-lr / len(x))
            bias.sub_(residual.sum(dim=0), alpha=lr / len(x))
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
) -> RecalibrationResult:
    """Match the federated features to the target gradients, then retrain the classifier.

    Args:
        features: (C, M, d) federated features.
        weight, bias: the aggregated global classifier, held fixed while matching.
        target: mean over clients of their per-class classifier gradients.
        present: (C,) bool, classes with a target this round.
        train_classes: (C,) bool, classes whose features train the new classifier
            (default: `present`).
    """
    weight, bias = weight.detach(), bias.detach()
    matched, before, after = descend(
        features,
        lambda v: feature_matching(v, weight, bias, target, present, distance),
        match_steps,
        feature_lr,
    )

    classes = present if train_classes is None else train_classes
    num_classes, per_class, _ = matched.shape
    labels = torch.arange(num_classes).repeat_interleave(per_class).view(num_classes, per_class)
    new_weight, new_bias = train_linear(
        matched[classes].flatten(0, 1), labels[classes].flatten(), num_classes,
        epochs, lr, batch_size, generator,
    )
    return RecalibrationResult(matched, new_weight, new_bias, before, after)


# Re-centre a class only while the classifier gives its samples less than this probability on
# average: there the (1 - p)-weighted mean below is close to the plain class mean; once the
# class is fitted, it is the mean of the few samples still misfitted, not where the class lies.
RECENTRE_BELOW = 0.5


def class_means_from_gradients(target: ClassGradients) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's mean feature, read off its classifier gradients: (C, d) and (C,) valid.

    For samples z of class c, row c of dCE/dW is mean((p_c - 1) z) and entry c of dCE/db is
    mean(p_c - 1): their ratio is the class's mean feature, weighted by 1 - p_c (how badly
    the classifier fits each sample). Valid while mean(p_c) < RECENTRE_BELOW.
    """
    assert target.weight is not None and target.bias is not None
    c = torch.arange(target.bias.shape[0])
    residual = target.bias[c, c]  # mean(p_c - 1), in [-1, 0]
    valid = residual < RECENTRE_BELOW - 1.0
    means = target.weight[c, c] / torch.where(valid, residual, -1.0)[:, None]
    return means, valid


def recentred(features: torch.Tensor, means: torch.Tensor, move: torch.Tensor,
              fresh: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The features of the classes in `move` shifted so that their mean is `means`.

    A class in `fresh` (seen for the first time) has no spread of its own yet: it starts
    from its mean plus N(0, s^2) noise, s = ||mean|| / (2 sqrt(d)).
    """
    dim = features.shape[-1]
    noise = torch.randn(features.shape, generator=generator)
    noise = noise * (means.norm(dim=-1) / (2 * dim**0.5))[:, None, None]
    start = torch.where((move & fresh)[:, None, None], noise, features)
    shifted = start - start.mean(dim=1, keepdim=True) + means[:, None, :]
    return torch.where(move[:, None, None], shifted, features)


@dataclass(frozen=True)
class RecalibrationSettings:
    """The knobs of `recalibrate` that a method's config sets."""

    match_steps: int
    feature_lr: float
    epochs: int
    lr: float
    batch_size: int
    distance: Distance = "cosine"
    recentre: bool = False  # put each class's features at its mean feature first


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
        """Match against `weight`, `bias` (held fixed); the features keep the result."""
        if any(s.weight_grads is None or s.bias_grads is None for s in stats):
            raise ValueError("recalibration needs the classifier gradients of every reply")
        held = torch.stack([s.present for s in stats])
        feature, holders = masked_class_mean(torch.stack([s.feature_grads for s in stats]), held)
        target = ClassGradients(
            feature,
            masked_class_mean(torch.stack([s.weight_grads for s in stats]), held)[0],
            masked_class_mean(torch.stack([s.bias_grads for s in stats]), held)[0],
        )
        present = holders > 0
        if settings.recentre:
            means, valid = class_means_from_gradients(target)
            self.features = recentred(self.features, means, valid & present, ~self.seen,
                                      generator)
        self.seen |= present
        result = recalibrate(
            self.features, weight, bias, target, present,
            match_steps=settings.match_steps, feature_lr=settings.feature_lr,
            epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
            generator=generator, distance=settings.distance, train_classes=self.seen,
        )
        self.features = result.features
        return result

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"features": self.features, "seen": self.seen}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.features = state["features"].clone()
        self.seen = state["seen"].clone()
