"""Hyper-prototypes: L learnable vectors per class, held by the server.

Clients use them through two derived views (`anchors` for HPCL, `centers` for HPAL); the
server moves them so that the CE gradients they induce in the global classifier match the
gradients clients measured on real features (`match_hyperprototypes`): by the paper, the
gradients w.r.t. the features (`matching_objective`); as a variant, the gradients w.r.t. each
class's own classifier row (`row_matching_objective`).
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
# what the hyper-prototypes' induced gradients are matched to: the clients' mean CE gradient
# w.r.t. a class's features (the paper's), or w.r.t. the class's own classifier row
Target = Literal["feature-grads", "row-grads"]


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


def centred_directions(rows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Unit (C, d) rows minus their mean over the `present` classes; absent rows are zero.

    What tells classes apart: the component shared by every class (real features after a
    ReLU share one dominant direction) is removed, and each class weighs the same whatever
    the length of its row."""
    keep = present[:, None]
    unit = torch.where(keep, F.normalize(rows, dim=-1), torch.zeros((), dtype=rows.dtype))
    mean = unit.sum(dim=0) / present.sum().clamp(min=1)
    return torch.where(keep, unit - mean, torch.zeros((), dtype=rows.dtype))


def own_row_gradients(hyperprototypes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                      ) -> torch.Tensor:
    """(C, d): the mean over l of dCE(h(P[c,l]), c)/dW_c, class c's gradient w.r.t. its own
    classifier row, ``mean_l (p_c(P[c,l]) - 1) P[c,l]``: minus the class's vectors averaged
    with the weight the classifier still owes each of them."""
    probs = torch.softmax(hyperprototypes @ weight.T + bias, dim=-1)  # (C, L, C)
    own = torch.diagonal(probs, dim1=0, dim2=2).T  # (C, L): probs[c, l, c]
    return ((own - 1.0)[..., None] * hyperprototypes).mean(dim=1)


def row_matching_objective(
    weight: torch.Tensor,
    bias: torch.Tensor,
    target_rows: torch.Tensor,
    present: torch.Tensor,
) -> LossAndGrad:
    """Cosine distance, summed over present classes, between the centred directions of the
    hyper-prototypes' own-row gradients (`own_row_gradients`) and of the clients' mean
    own-row gradients `target_rows` (C, d), with its gradient by autograd.

    Row c of dCE/dW over class c's samples is minus their (1 - p_c)-weighted mean feature: it
    carries where the class lies in feature space, which the feature gradient, about -W_c
    whatever the feature, does not. Centring keeps what separates the classes."""
    goal = centred_directions(target_rows, present)
    keep = present.to(weight.dtype)

    def loss(hyperprototypes: torch.Tensor) -> torch.Tensor:
        induced = centred_directions(own_row_gradients(hyperprototypes, weight, bias), present)
        cos = F.cosine_similarity(induced, goal, dim=-1, eps=1e-12)
        return ((1.0 - cos) * keep).sum()

    return with_autograd(loss)


def match_hyperprototypes(
    hyperprototypes: torch.Tensor,
    objective: LossAndGrad,
    steps: int,
    lr: float,
    step: Step = "sgd",
) -> MatchResult:
    """`steps` descent steps on the (C, L, d) hyper-prototypes against a matching
    `objective` (`matching_objective` or `row_matching_objective`, built at the new global
    classifier; `step`: see `gradmatch.descend`)."""
    start = hyperprototypes.detach()
    result, before, after = descend(start, objective, steps, lr, step)
    movement = ((result - start).norm() / start.norm().clamp(min=1e-12)).item()
    return MatchResult(result, before, after, movement)
