"""Hyper-prototypes: L learnable vectors per class, held by the server.

Clients use them through two derived views (`anchors` for HPCL, `centers` for HPAL); the
server moves them so that the CE gradients they induce in the global classifier match the
gradients clients measured on real features (`match_hyperprototypes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fedhpro_flwr.algorithms.gradmatch import (
    Distance,
    LossAndGrad,
    Step,
    class_gradients,
    cosine_rows,
    descend,
    distance_and_grad,
    prepared_target,
    vector_distance,
    with_autograd,
)

Init = Literal["normal", "orthogonal"]


def init_hyperprototypes(
    num_classes: int, per_class: int, dim: int, generator: torch.Generator,
    kind: Init = "normal",
) -> torch.Tensor:
    """(C, L, d) drawn from N(0, 1) (the paper).

    "orthogonal" then moves each class's draws so that their mean points along one of C
    orthonormal directions (C <= d), keeping its length and the spread within the class:
    the mean directions of N(0, 1) draws are only nearly orthogonal (cosines of order
    1/sqrt(d)), which matters when C approaches d.
    """
    draws = torch.randn(num_classes, per_class, dim, generator=generator)
    if kind == "normal":
        return draws
    if kind != "orthogonal":
        raise ValueError(f"unknown initialisation '{kind}'; allowed: normal, orthogonal")
    if num_classes > dim:
        raise ValueError(f"orthogonal initialisation needs classes <= feature dim "
                         f"({num_classes} > {dim})")
    means = draws.mean(dim=1)  # (C, d)
    basis, _ = torch.linalg.qr(means.T)  # (d, C) orthonormal; column c spans means[:c+1]
    directions = basis.T * torch.sign((basis.T * means).sum(dim=1, keepdim=True))
    target = directions * means.norm(dim=1, keepdim=True)
    return draws + (target - means)[:, None, :]


def anchors(hyperprototypes: torch.Tensor) -> torch.Tensor:
    """HPCL's anchors: the mean of each class's normalised hyper-prototypes, (C, d)."""
    return F.normalize(hyperprototypes, dim=-1).mean(dim=1)


def centers(hyperprototypes: torch.Tensor) -> torch.Tensor:
    """HPAL's targets: each class's normalised mean hyper-prototype, (C, d)."""
    return F.normalize(hyperprototypes.mean(dim=1), dim=-1)


@dataclass(frozen=True)
class MatchResult:
    """The updated hyper-prototypes and how the matching went."""

    hyperprototypes: torch.Tensor
    loss_before: float
    loss_after: float
    movement: float  # ||P_new - P_old|| / ||P_old||


def matching_loss(
    hyperprototypes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor,
    distance: Distance,
) -> torch.Tensor:
    """Sum over present classes of D(mean_l dCE(h(P[c,l]), c)/dP[c,l], target[c])."""
    grads = class_gradients(hyperprototypes, weight, bias, with_classifier=False).feature
    # dCE/dP[c,l] is the per-sample gradient; its mean over l is class_gradients' mean.
    return vector_distance(grads[present], target[present], distance).sum()


def matching_objective(
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor,
    distance: Distance,
) -> LossAndGrad:
    """`matching_loss` and its gradient w.r.t. the (C, L, d) hyper-prototypes.

    In closed form for cosine and mse: with ``r_cl = softmax(W P_cl + b) - e_c`` the class's
    gradient is ``g_c = mean_l r_cl W``, so ``dL/dr_cl = (dL/dg_c) W^T / L`` for every l, and
    back through the softmax to ``dL/dP_cl = dlogits_cl W``: a dozen small tensor operations
    per step where autograd's graph costs several times more on the server's small problems.
    "scalar" has no useful gradient (sign agreement) and keeps autograd.
    """
    if distance == "scalar":
        return with_autograd(lambda p: matching_loss(p, weight, bias, target, present, distance))
    prepared = prepared_target(target, present, distance)
    constant = cosine_rows(target, present) if distance == "cosine" else 0
    eye = torch.eye(weight.shape[0], dtype=weight.dtype)[:, :, None]
    bias_column = bias[:, None]

    def loss_and_grad(hyperprototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # logits laid out (class, output, hyper-prototype): the softmax runs over the middle
        # axis, several times faster on the CPU than over a short last one
        probs = torch.matmul(weight, hyperprototypes.transpose(1, 2)).add_(bias_column)
        probs = probs.softmax(dim=1)  # (C, C, L)
        mean_residual = (probs - eye).mean(dim=2)  # (C, C)
        loss, d_grads = distance_and_grad(mean_residual @ weight, prepared, present, distance)
        d_residual = (d_grads @ weight.T).div_(hyperprototypes.shape[1])[:, :, None]
        d_logits = probs * (d_residual - (d_residual * probs).sum(dim=1, keepdim=True))
        return loss + constant, torch.matmul(d_logits.transpose(1, 2), weight)

    return loss_and_grad


def match_hyperprototypes(
    hyperprototypes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor,
    steps: int,
    lr: float,
    distance: Distance = "cosine",
    step: Step = "sgd",
) -> MatchResult:
    """`steps` descent steps on the hyper-prototypes against the clients' mean feature
    gradients (`step`: see `gradmatch.descend`).

    Args:
        hyperprototypes: (C, L, d).
        weight, bias: the new global classifier, held fixed.
        target: (C, d) mean over clients of their per-class feature gradients.
        present: (C,) bool, classes at least one client sent a gradient for.
    """
    weight, bias = weight.detach(), bias.detach()
    start = hyperprototypes.detach()
    result, before, after = descend(
        start, matching_objective(weight, bias, target, present, distance), steps, lr, step
    )
    movement = ((result - start).norm() / start.norm().clamp(min=1e-12)).item()
    return MatchResult(result, before, after, movement)
