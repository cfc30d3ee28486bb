"""Client step 1: per-class gradients measured at the received global model.

Before local training, with the model in eval mode, each client takes up to `per_class`
samples of every class it holds, computes their features, and averages the CE gradients
w.r.t. the features and the classifier (``gradmatch.class_gradients``), and the features'
mean and spread. Classes it lacks are reported as absent, never as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedhpro_flwr.algorithms.gradmatch import class_gradients
from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.privacy import ClientPrivacy, clip_rows
from fedhpro_flwr.data.federated import TensorData


@dataclass(frozen=True)
class ClassStatistics:
    """What a client measured per class; rows of absent classes are zeros."""

    present: torch.Tensor  # (C,) bool: classes the client holds
    counts: torch.Tensor  # (C,) int64: samples per class in the client's data
    feature_grads: torch.Tensor  # (C, d)
    weight_grads: torch.Tensor | None  # (C, C, d); None when not uploaded
    bias_grads: torch.Tensor | None  # (C, C)
    feature_means: torch.Tensor | None = None  # (C, d)
    # (C,): mean squared distance of a class's features to their mean, per dimension
    feature_vars: torch.Tensor | None = None


def sample_per_class(
    labels: torch.Tensor, num_classes: int, per_class: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (C, per_class) index grid, row c holding samples of class c, and its mask.

    Sorts by label with random tie-breaking, then keeps the first `per_class` of each class:
    one sort instead of a loop over classes.
    """
    keys = labels.double() + torch.rand(len(labels), generator=generator, dtype=torch.double)
    order = torch.argsort(keys)
    sorted_labels = labels[order]
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels)) - starts[sorted_labels]
    keep = rank < per_class
    index = torch.zeros(num_classes, per_class, dtype=torch.long)
    mask = torch.zeros(num_classes, per_class, dtype=torch.bool)
    index[sorted_labels[keep], rank[keep]] = order[keep]
    mask[sorted_labels[keep], rank[keep]] = True
    return index, mask


@torch.no_grad()
def extract_class_statistics(
    model: Backbone,
    data: TensorData,
    per_class: int,
    repeats: int,
    generator: torch.Generator,
    device: torch.device,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
    classifier: bool = True,
    chunk: int | None = None,
) -> ClassStatistics:
    """Per-class mean CE gradients at the model as received, and the features' moments.

    `head` (weight, bias) replaces the model's classifier in the loss when given (CReFF
    measures at its re-trained classifier). `classifier=False` leaves out the gradients
    w.r.t. the classifier (C x C x d, the only part growing as C^2) for a caller that does
    not send them. Features are computed `chunk` samples at a time, by default 64 on a CPU,
    where batches of a few dozen keep the activations in cache (64 against 512: 0.29 s against
    0.35-0.43 s for a client's 1,138 digits, one thread), and 512 elsewhere, where each batch
    costs its kernel launches (the size the project's GPU figures were measured with).
    """
    chunk = chunk or (64 if device.type == "cpu" else 512)
    model.eval()
    num_classes = data.num_classes
    if head is None:
        head = (model.classifier.weight, model.classifier.bias)
    weight, bias = (t.detach().to(device) for t in head)
    counts = data.class_counts()
    present = counts > 0
    sums: list[torch.Tensor] | None = None
    for _ in range(repeats):
        index, mask = sample_per_class(data.y, num_classes, per_class, generator)
        picked = index[mask]
        z = torch.cat([
            model.features(data.x[picked[s : s + chunk]].to(device))
            for s in range(0, len(picked), chunk)
        ])
        grid = torch.zeros(num_classes, per_class, z.shape[1], device=device)
        grid[mask.to(device)] = z
        mask_d = mask.to(device)
        grads = class_gradients(grid, weight, bias, mask_d, with_classifier=classifier)
        taken = mask_d.sum(dim=1).clamp(min=1)
        means = grid.sum(dim=1) / taken[:, None]
        squares = ((grid - means[:, None]) ** 2 * mask_d[..., None]).sum(dim=(1, 2))
        variances = squares / (taken * grid.shape[2])
        parts = [grads.feature, means, variances]
        if classifier:
            parts += [grads.weight, grads.bias]
        sums = parts if sums is None else [a + b for a, b in zip(sums, parts, strict=True)]
    assert sums is not None
    feature, means, variances, *head_grads = (s.cpu() / repeats for s in sums)
    weight_g, bias_g = head_grads if classifier else (None, None)
    return ClassStatistics(present, counts, feature, weight_g, bias_g, means, variances)


@torch.no_grad()
def private_class_statistics(
    model: Backbone,
    data: TensorData,
    privacy: ClientPrivacy,
    device: torch.device,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
    classifier: bool = True,
    chunk: int = 512,
) -> ClassStatistics:
    """`extract_class_statistics` as differential privacy releases it: measured once on every
    record (so one record is in one class's sums, where sampling `per_class` could swap it for
    another), with each record's parts clipped and noised by `privacy`: its CE gradient w.r.t.
    the logits (the bias gradient; the feature gradient is W^T of it, computed after the
    release), its feature and squared feature norm (the moments), and with `classifier` its
    gradient w.r.t. the classifier weight."""
    model.eval()
    num_classes, bound = data.num_classes, privacy.cfg.stats_clip
    if head is None:
        head = (model.classifier.weight, model.classifier.bias)
    weight, bias = (t.detach().to(device) for t in head)
    sums = privacy.class_sums(num_classes)
    for start in range(0, len(data), chunk):
        y = data.y[start : start + chunk].to(device)
        z = model.features(data.x[start : start + chunk].to(device))
        residual = torch.softmax(z @ weight.T + bias, dim=1) - F.one_hot(y, num_classes)
        clipped = clip_rows(z, bound)
        parts = [residual, clipped, clipped.pow(2).sum(dim=1, keepdim=True) / bound]
        if classifier:
            parts.append((residual[:, :, None] * z[:, None, :]).flatten(1))
        sums.add(parts, y)
    release = sums.release()
    bias_g, means, squares, *rest = (m.to(device) for m in release.means)
    spread = (squares[:, 0] * bound - means.pow(2).sum(dim=1)) / means.shape[1]
    variances = torch.where(release.present.to(device), spread.clamp(min=0.0), 0.0)
    weight_g = rest[0].view(num_classes, num_classes, -1).cpu() if classifier else None
    return ClassStatistics(release.present, release.counts, (bias_g @ weight).cpu(), weight_g,
                           bias_g.cpu() if classifier else None, means.cpu(), variances.cpu())
