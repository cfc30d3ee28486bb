"""How the global class anchors of a prototype method behave, measured the same way for all.

"Anchors" are what a method's clients are pulled towards: FedHPro's anchors (the mean of
each class's normalised hyper-prototypes), FedProto's averaged prototypes, FedTGP's
generated prototypes, FPL's unbiased prototypes. Every measure here is a cosine, so it does
not depend on the anchors' scale, which differs between methods.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fedhpro_flwr.algorithms.extraction import sample_per_class
from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.data.federated import TensorData


def anchor_cosines(anchors: torch.Tensor, present: torch.Tensor) -> dict[str, float]:
    """Inter-class separation: mean and largest cosine between two classes' anchors."""
    unit = F.normalize(anchors[present], dim=-1)
    n = len(unit)
    if n < 2:
        return {}
    cos = unit @ unit.T
    off = cos[~torch.eye(n, dtype=torch.bool)]
    return {"anchor_cosine_mean": off.mean().item(), "anchor_cosine_max": off.max().item()}


def relative_change(before: torch.Tensor, after: torch.Tensor, present: torch.Tensor) -> float:
    """||after - before|| / ||before|| over the classes in `present` (at least one)."""
    old, new = before[present], after[present]
    return ((new - old).norm() / old.norm().clamp(min=1e-12)).item()


def consistency(local: torch.Tensor, local_present: torch.Tensor, anchors: torch.Tensor,
                anchor_present: torch.Tensor) -> float | None:
    """Mean over the classes both sides have of cos(local prototype, global anchor), or None
    when they share no class."""
    shared = local_present.to(anchors.device) & anchor_present
    if not bool(shared.any()):
        return None
    local = local.to(anchors.device)
    return F.cosine_similarity(local[shared], anchors[shared], dim=-1).mean().item()


def consistency_metric(local: torch.Tensor, local_present: torch.Tensor, anchors: torch.Tensor,
                       anchor_present: torch.Tensor) -> dict[str, float]:
    """A client's `consistency` metric, or nothing when it shares no class with the anchors."""
    value = consistency(local, local_present, anchors, anchor_present)
    return {} if value is None else {"consistency": value}


def spread(values: list[float], prefix: str) -> dict[str, float]:
    """Mean, population std and minimum of per-client values, keyed `prefix_mean` etc."""
    if not values:
        return {}
    t = torch.tensor(values, dtype=torch.float64)
    return {f"{prefix}_mean": t.mean().item(), f"{prefix}_std": t.std(correction=0).item(),
            f"{prefix}_min": t.min().item()}


def embedding_2d(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                 present: torch.Tensor) -> dict[str, Any]:
    """A 2-D PCA of the L2-normalised features and anchors together (the geometry the
    cosines above measure), as JSON-ready lists."""
    unit_features = F.normalize(features.float(), dim=-1)
    unit_anchors = F.normalize(anchors[present].float(), dim=-1)
    points = torch.cat([unit_features, unit_anchors])
    centred = points - points.mean(dim=0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ vh[:2].T
    explained = (singular[:2].pow(2).sum() / singular.pow(2).sum().clamp(min=1e-12)).item()
    n = len(unit_features)
    return {
        "features": projected[:n].tolist(),
        "labels": labels.tolist(),
        "anchors": projected[n:].tolist(),
        "anchor_classes": torch.nonzero(present).flatten().tolist(),
        "explained_variance": explained,
    }


@torch.no_grad()
def embedding_of(model: Backbone, data: TensorData, anchors: torch.Tensor,
                 present: torch.Tensor, per_class: int, seed: int,
                 device: torch.device) -> dict[str, Any]:
    """`embedding_2d` of up to `per_class` samples of every class of `data` (the same
    samples for the same seed) through `model`, with the anchors."""
    index, mask = sample_per_class(data.y, data.num_classes, per_class,
                                   torch.Generator().manual_seed(seed))
    picked = index[mask]
    model.eval()
    features = model.features(data.x[picked].to(device)).cpu()
    return embedding_2d(features, data.y[picked], anchors.cpu(), present.cpu())
