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
# w.r.t. a class's features (the paper's), w.r.t. the class's own classifier row, or w.r.t.
# the whole classifier (weight and bias, as CReFF matches its federated features)
Target = Literal["feature-grads", "row-grads", "classifier-grads"]


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


def separated(hyperprototypes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The (C, L, d) hyper-prototypes with the mean of each `present` class moved onto the
    nearest set of mutually orthogonal directions, each mean keeping its length and each
    class the spread of its L vectors (C <= d).

    Nearest: the orthonormal rows closest to the unit mean directions in the least-squares
    sense, ``U V^T`` of their SVD, which moves every class as little as orthogonality allows
    and favours none (Gram-Schmidt would keep the first class and bend the others). Learned
    anchors point where the classes lie, so close classes get close anchors; this keeps where
    they point as far as it can while separating them as far as the dimension allows.
    """
    chosen = present.nonzero().squeeze(1)
    if len(chosen) > hyperprototypes.shape[2]:
        raise ValueError(f"orthogonal class means need classes <= feature dim "
                         f"({len(chosen)} > {hyperprototypes.shape[2]})")
    means = hyperprototypes[chosen].mean(dim=1)  # (P, d)
    left, _, right = torch.linalg.svd(F.normalize(means, dim=1), full_matrices=False)
    goal = (left @ right) * means.norm(dim=1, keepdim=True)
    moved = hyperprototypes.clone()
    moved[chosen] += (goal - means)[:, None, :]
    return moved


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


def nearest_classes(hyperprototypes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    count: int) -> torch.Tensor:
    """(C, count) class indices: for each class, itself first, then the classes the
    classifier scores highest on its mean hyper-prototype (one C x C product)."""
    logits = hyperprototypes.mean(dim=1) @ weight.T + bias
    own = torch.arange(len(logits))
    logits[own, own] = torch.inf
    return logits.topk(count, dim=1).indices


def neighbour_agreement(hyperprototypes: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor, neighbours: torch.Tensor) -> float:
    """Mean over classes of the cosine between the feature gradient the hyper-prototypes
    induce with their softmax restricted to `neighbours` (C, K) and with the full softmax:
    how close what the restricted matching matches is to the paper's quantity (one C x L x C
    product, once a round)."""
    num_classes = len(neighbours)
    logits = hyperprototypes @ weight.T + bias  # (C, L, C)
    outside = torch.full((num_classes, num_classes), -torch.inf, dtype=logits.dtype)
    outside.scatter_(1, neighbours, 0.0)
    own = torch.eye(num_classes, dtype=logits.dtype)[:, None, :]

    def induced(scores: torch.Tensor) -> torch.Tensor:
        return (scores.softmax(dim=-1) - own).mean(dim=1) @ weight

    return F.cosine_similarity(induced(logits + outside[:, None, :]), induced(logits),
                               dim=1).mean().item()


def matching_objective(
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor,
    distance: Distance,
    neighbours: torch.Tensor | None = None,
) -> LossAndGrad:
    """`matching_loss` and its gradient w.r.t. the (C, L, d) hyper-prototypes.

    In closed form for cosine and mse: with ``r_cl = softmax(W P_cl + b) - e_c`` the class's
    gradient is ``g_c = mean_l r_cl W``, so ``dL/dr_cl = (dL/dg_c) W^T / L`` for every l, and
    back through the softmax to ``dL/dP_cl = dlogits_cl W``: a dozen small tensor operations
    per step where autograd's graph costs several times more on the server's small problems.
    "scalar" has no useful gradient (sign agreement) and keeps autograd.

    `neighbours` (C, K) (`nearest_classes`) restricts class c's softmax to the classes in its
    row, those holding nearly all its probability: a step costs ``C L K d`` instead of
    ``C L C d``, linear in the classes for a fixed K.
    """
    if distance == "scalar":
        if neighbours is not None:
            raise ValueError("the scalar distance matches over every class; no neighbours")
        return with_autograd(lambda p: matching_loss(p, weight, bias, target, present, distance))
    prepared = prepared_target(target, present, distance)
    constant = cosine_rows(target, present) if distance == "cosine" else 0
    if neighbours is None:  # every class: one classifier for all, broadcast
        rows, bias_column = weight, bias[:, None]
        own = torch.eye(weight.shape[0], dtype=weight.dtype)[:, :, None]
    else:  # each class its own rows, (C, K, d)
        rows, bias_column = weight[neighbours], bias[neighbours][:, :, None]
        own = (neighbours == torch.arange(len(neighbours))[:, None]).to(weight.dtype)[:, :, None]

    def loss_and_grad(hyperprototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # logits laid out (class, output, hyper-prototype): the softmax runs over the middle
        # axis, several times faster on the CPU than over a short last one
        probs = torch.matmul(rows, hyperprototypes.transpose(1, 2)).add_(bias_column)
        probs = probs.softmax(dim=1)  # (C, C or K, L)
        mean_residual = (probs - own).mean(dim=2)
        if neighbours is None:
            grads = mean_residual @ weight
        else:
            grads = torch.matmul(mean_residual[:, None, :], rows).squeeze(1)
        loss, d_grads = distance_and_grad(grads, prepared, present, distance)
        if neighbours is None:
            d_residual = d_grads @ weight.T
        else:
            d_residual = torch.matmul(rows, d_grads[:, :, None]).squeeze(2)
        d_residual = d_residual.div_(hyperprototypes.shape[1])[:, :, None]
        d_logits = probs * (d_residual - (d_residual * probs).sum(dim=1, keepdim=True))
        return loss + constant, torch.matmul(d_logits.transpose(1, 2), rows)

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


def row_matching_objective(
    weight: torch.Tensor,
    bias: torch.Tensor,
    target_rows: torch.Tensor,
    present: torch.Tensor,
) -> LossAndGrad:
    """Cosine distance, summed over present classes, between the centred directions of the
    hyper-prototypes' own-row gradients (`gradmatch.class_gradients`' `own_row`) and of the
    clients' mean own-row gradients `target_rows` (C, d), with its gradient by autograd.

    Row c of dCE/dW over class c's samples is minus their (1 - p_c)-weighted mean feature: it
    carries where the class lies in feature space, which the feature gradient, about -W_c
    whatever the feature, does not. Centring keeps what separates the classes."""
    goal = centred_directions(target_rows, present)
    keep = present.to(weight.dtype)

    def loss(hyperprototypes: torch.Tensor) -> torch.Tensor:
        own_rows = class_gradients(hyperprototypes, weight, bias, with_classifier=False).own_row
        induced = centred_directions(own_rows, present)
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
