"""Class prototypes (mean features per class): measured on clients, combined on the server.

Shared by the prototype methods (FedProto, FedTGP, FPL). Plain PyTorch.
"""

from __future__ import annotations

import torch

from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.privacy import ClientPrivacy
from fedhpro_flwr.data.federated import TensorData


@torch.no_grad()
def local_prototypes(
    model: Backbone, data: TensorData, device: torch.device,
    privacy: ClientPrivacy | None = None, chunk: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, d) mean feature of each class in `data` (eval mode) and the (C,) class counts; under
    `privacy`, both as released (each feature clipped, noisy sums over noisy counts).

    Rows of classes the data lacks (or, under privacy, does not report) are zeros; the counts
    say which they are.
    """
    model.eval()
    sums = torch.zeros(data.num_classes, model.feature_dim, device=device)
    private = privacy.class_sums(data.num_classes) if privacy is not None else None
    for start in range(0, len(data), chunk):
        z = model.features(data.x[start : start + chunk].to(device))
        if private is not None:
            private.add([z], data.y[start : start + chunk])
        else:
            sums.index_add_(0, data.y[start : start + chunk].to(device), z)
    if private is not None:
        release = private.release()
        return release.means[0], release.counts
    counts = data.class_counts()
    means = sums.cpu() / counts.clamp(min=1)[:, None].to(sums.dtype)
    return means, counts


def weighted_class_mean(
    prototypes: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedProto's aggregation: per class, the count-weighted mean over the clients holding it.

    Args:
        prototypes: (K, C, d) one row per client.
        counts: (K, C) samples per class per client; 0 masks the client's row out.
    Returns ((C, d) global prototypes, (C,) bool: classes some client holds).
    """
    weights = counts.to(prototypes.dtype)
    totals = weights.sum(dim=0)
    mean = torch.einsum("kc,kcd->cd", weights, prototypes) / totals.clamp(min=1)[:, None]
    return mean, totals > 0


@torch.no_grad()
def nearest_prototype_accuracy(
    model: Backbone,
    data: TensorData,
    prototypes: torch.Tensor,
    present: torch.Tensor,
    device: torch.device,
    chunk: int = 512,
) -> float:
    """Accuracy of predicting the class whose prototype is nearest (L2) to the feature.

    Only classes with a prototype can be predicted; with none, the accuracy is 0.
    """
    if not present.any():
        return 0.0
    model.eval()
    candidates = torch.nonzero(present).flatten().to(device)
    protos = prototypes.to(device)[candidates]
    correct = 0
    for start in range(0, len(data), chunk):
        z = model.features(data.x[start : start + chunk].to(device))
        predicted = candidates[torch.cdist(z, protos).argmin(dim=1)]
        correct += (predicted == data.y[start : start + chunk].to(device)).sum().item()
    return correct / max(len(data), 1)
