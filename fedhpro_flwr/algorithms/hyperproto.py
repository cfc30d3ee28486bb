"""Hyper-prototypes: L learnable vectors per class, held by the server.

Clients use them through two derived views (`anchors` for HPCL, `centers` for HPAL); the
server moves them so that the CE gradients they induce in the global classifier match the
gradients clients measured on real features (`match_hyperprototypes`): by the paper, the
gradients w.r.t. the features (`matching_objective`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedhpro_flwr.algorithms.gradmatch import (
    Distance,
    LossAndGrad,
    class_gradients,
    cosine_rows,
    descend,
    distance_and_grad,
    prepared_target,
    vector_distance,
)


def init_hyperprototypes(num_classes: int, per_class: int, dim: int,
                         generator: torch.Generator) -> torch.Tensor:
    """(C, L, d) drawn from N(0, 1) (the paper)."""
    return torch.randn(num_classes, per_class, dim, generator=generator)


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

    `neighbours` (C, K) (`nearest_classes`) restricts class c's softmax to the classes in its
    row, those holding nearly all its probability: a step costs ``C L K d`` instead of
    ``C L C d``, linear in the classes for a fixed K.
    """
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


def match_hyperprototypes(
    hyperprototypes: torch.Tensor,
    objective: LossAndGrad,
    steps: int,
    lr: float,
) -> MatchResult:
    """`steps` descent steps on the (C, L, d) hyper-prototypes against a matching
    `objective` (`matching_objective`, built at the new global classifier)."""
    start = hyperprototypes.detach()
    result, before, after = descend(start, objective, steps, lr)
    movement = ((result - start).norm() / start.norm().clamp(min=1e-12)).item()
    return MatchResult(result, before, after, movement)
