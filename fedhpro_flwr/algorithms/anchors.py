"""FedSA's semantic anchors and client loss (AAAI 2025; official code lokinko/FedSA), in plain
PyTorch.

The server draws one anchor per class, randn(C, d) through an untrained projector, and then
moves it only very slowly towards the clients' averaged class prototypes: in effect fixed,
random class targets, the same for every client whatever its backbone. A client trains its
features and head against them with three terms beside its cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def semantic_anchors(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """(C, d) anchors as FedSA's server draws them: randn(C, d) through an untrained
    Linear-BN-ReLU-Linear-BN-ReLU (its BatchNorm in training mode, over the C rows), detached,
    so non-negative; the same for a seed whatever ran before."""
    if num_classes < 2:
        raise ValueError("semantic anchors need at least two classes (BatchNorm over them)")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        projector = nn.Sequential(
            nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(),
            nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(),
        )
        centres = torch.randn(num_classes, dim)  # drawn after the projector, as its code
        with torch.no_grad():
            return projector.train()(centres).detach()


def move_anchors(anchors: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor,
                 momentum: float) -> torch.Tensor:
    """``a_c <- momentum * a_c + (1 - momentum) * p_c`` for the classes with a prototype this
    round (`present`); the others stay. FedSA's code uses momentum 0.9999."""
    moved = momentum * anchors + (1.0 - momentum) * prototypes
    return torch.where(present[:, None], moved, anchors)


def class_gap(points: torch.Tensor) -> float:
    """Mean over the rows of the L2 distance to the nearest other row: how far apart the
    classes are. -inf for fewer than two rows (no gap to speak of, as FedSA's code)."""
    if len(points) < 2:
        return float("-inf")
    distances = torch.cdist(points, points)
    distances.fill_diagonal_(float("inf"))
    return distances.min(dim=1).values.mean().item()


def margin_gap(local_prototypes: torch.Tensor | None, anchors: torch.Tensor) -> float:
    """FedSA's margin: max(local gap, global gap), over the client's own last-round class
    prototypes (rows of the classes it held) and over the anchors; the global gap alone
    before the client has prototypes of its own."""
    global_gap = class_gap(anchors)
    if local_prototypes is None:
        return global_gap
    return max(class_gap(local_prototypes), global_gap)


def calibration_loss(head: nn.Module, anchors: torch.Tensor) -> torch.Tensor:
    """Anchor-based classifier calibration: the head must classify each anchor as its class,
    ``CE(head(a), arange(C))``."""
    labels = torch.arange(len(anchors), device=anchors.device)
    return F.cross_entropy(head(anchors), labels)


def anchor_regularisation(z: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor
                          ) -> torch.Tensor:
    """Anchor-based regularisation: ``MSE(z, a_y)``, averaged over all B x d entries."""
    return F.mse_loss(z, anchors[y])


def margin_contrastive_loss(z: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor,
                            gap: float) -> torch.Tensor:
    """Anchor-based margin-enhanced contrastive learning: CE over ``-(||z - a_c||_2 + gap *
    [c = y])``, so the own anchor must be nearer than every other by `gap` (no temperature)."""
    distance = torch.cdist(z, anchors)
    distance = distance + gap * F.one_hot(y, len(anchors)).to(distance.dtype)
    return F.cross_entropy(-distance, y)


def fedsa_loss(z: torch.Tensor, y: torch.Tensor, head: nn.Module, anchors: torch.Tensor,
               gap: float, *, cc: float, lam: float, mcl: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A FedSA client's batch loss from its features `z`: (CE(head(z), y) + cc * calibration
    + lam * regularisation + mcl * margin contrastive, the CE alone)."""
    ce = F.cross_entropy(head(z), y)
    loss = (ce + cc * calibration_loss(head, anchors)
            + lam * anchor_regularisation(z, y, anchors)
            + mcl * margin_contrastive_loss(z, y, anchors, gap))
    return loss, ce
