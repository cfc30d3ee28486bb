"""FedNH (Dai et al., AAAI 2023; Yutong-Dai/FedNH): a scaled cosine classifier over class
prototypes that the server spreads out at the start and then moves slowly towards the
clients' class means.

The model normalises the backbone's features and scores them against the prototypes P,
``logits = s * normalize(f) @ P^T``, with a learnable scale s; P is not the clients' to train.
The server's update of P from the clients' count-weighted class means is `smoothed_prototypes`.
Plain PyTorch; the Flower side is `methods.fednh`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedhpro_flwr.algorithms.models import Backbone


def orthonormal_prototypes(num_classes: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(C, d) unit rows drawn from `generator`, mutually orthogonal when C <= d (FedNH's
    `orthogonal` head init): the Q factor of a Gaussian matrix, signs fixed so that the draw
    is uniform over such matrices.

    C > d rows cannot all be orthogonal in d dimensions: then they are the rows of a (C, d)
    matrix with orthonormal columns (what `torch.nn.init.orthogonal_` gives FedNH's code in
    that case), scaled to unit length, which FedNH's first server update does to them anyway.
    """
    tall, wide = max(num_classes, dim), min(num_classes, dim)
    gaussian = torch.randn(tall, wide, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)  # (tall, wide), orthonormal columns
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    rows = q.T if num_classes <= dim else q
    return F.normalize(rows, dim=1).float()


def scaled_cosine_logits(zh: torch.Tensor, prototypes: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """``s * zh @ P^T``: with unit features zh and unit prototypes, s times their cosines."""
    return scale * (zh @ prototypes.T)


class CosineClassifier(nn.Module):
    """FedNH's head: the server's prototypes (a buffer: not trained, not in the state dict,
    they travel in their own record) and the scale s (a parameter, averaged with the
    backbone; fixed when not `learn_scale`, as FedNH's `FedNH_fix_scaling`)."""

    prototypes: torch.Tensor

    def __init__(self, num_classes: int, dim: int, scale: float, learn_scale: bool):
        super().__init__()
        # NaN until the server's arrive: a model scored before it has them says so
        self.register_buffer("prototypes", torch.full((num_classes, dim), float("nan")),
                             persistent=False)
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)

    def forward(self, zh: torch.Tensor) -> torch.Tensor:
        return scaled_cosine_logits(zh, self.prototypes, self.scale)


class CosineBackbone(Backbone):
    """A backbone with FedNH's head: `features(x)` is the L2-normalised feature (the
    embedding FedNH's prototypes and class means live in), `classifier` the
    `CosineClassifier`. The backbone's own linear head is dropped: it would be trained by
    nothing and predict nothing."""

    classifier: CosineClassifier  # type: ignore[assignment]

    def __init__(self, backbone: Backbone, scale: float, learn_scale: bool):
        super().__init__()
        num_classes = backbone.classifier.out_features
        del backbone.classifier
        self.backbone = backbone
        self.feature_dim = backbone.feature_dim
        self.classifier = CosineClassifier(num_classes, self.feature_dim, scale, learn_scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone.features(x), dim=1)

    def set_prototypes(self, prototypes: torch.Tensor) -> None:
        """Classify against these (C, d) prototypes from now on."""
        self.classifier.prototypes.copy_(prototypes)


def scaled_class_means(means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A client's upload (FedNH's `_estimate_prototype`): each class's mean of the unit
    features, `means` (C, d), re-normalised and times its count (C,), so that the server's
    sum over clients weighs each client's direction by its samples. Classes without samples
    stay zero rows."""
    return F.normalize(means, dim=1) * counts[:, None].to(means.dtype)


def smoothed_prototypes(prototypes: torch.Tensor, scaled_means: torch.Tensor,
                        counts: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FedNH's server update: for every class some client holds,
    ``P_c <- normalize(rho P_c + (1 - rho) normalize(sum_k scaled_kc / sum_k n_kc))``; the
    other classes keep theirs.

    Args:
        prototypes: (C, d) the current unit prototypes P.
        scaled_means: (K, C, d) each client's `scaled_class_means`.
        counts: (K, C) each client's samples per class.
    Returns ((C, d) new prototypes, (C,) bool: the classes that moved).
    """
    held = counts.sum(dim=0) > 0
    # the mean over the clients' samples; dividing the sum by the count (as FedNH's code
    # does) would not change its direction, and the direction is all that is kept
    target = F.normalize(scaled_means.sum(dim=0), dim=1)
    moved = F.normalize(rho * prototypes + (1.0 - rho) * target, dim=1)
    return torch.where(held[:, None], moved, prototypes), held
