"""Per-class cross-entropy gradients through a linear classifier, and distances between them.

For a linear head ``h(z) = W z + b`` and a sample z of class c, the CE gradients have closed
forms: ``dCE/dz = W^T r``, ``dCE/dW = r z^T``, ``dCE/db = r`` with ``r = softmax(h(z)) - e_c``.
Laying features out as ``(C, B, d)`` (row c holds samples of class c) turns the per-class
means into a few batched matrix products: no loop over classes. The same function serves the
client (gradients on real features), the hyper-prototype update and the classifier
recalibration (gradients on learnable vectors, differentiated through with autograd).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Distance = Literal["cosine", "mse"]


@dataclass(frozen=True)
class ClassGradients:
    """Mean CE gradients per class: w.r.t. the feature (C, d), the weight (C, C, d) and the
    bias (C, C)."""

    feature: torch.Tensor
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def softmax_residual(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, probabilities - one-hot), both (C, B, C), of the linear head on features
    laid out by class (row c has label c): the residual is dCE/dlogits per sample."""
    probs = torch.softmax(features @ weight.T + bias, dim=-1)
    eye = torch.eye(features.shape[0], dtype=probs.dtype, device=probs.device)
    return probs, probs - eye[:, None, :]


def class_gradients(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    with_classifier: bool = True,
) -> ClassGradients:
    """Mean CE gradients of each class's features; row c of `features` has label c.

    Args:
        features: (C, B, d) features, row c holding (up to) B samples of class c.
        weight, bias: the linear classifier, (C, d) and (C,).
        mask: (C, B) bool, which slots hold real samples; None means all of them.
        with_classifier: also return the gradients w.r.t. the classifier's parameters.
    Rows without any sample come out as zeros; callers mask them.
    """
    num_classes = features.shape[0]
    residual = softmax_residual(features, weight, bias)[1]
    if mask is None:
        counts = torch.full((num_classes,), features.shape[1], device=features.device)
    else:
        residual = residual * mask[..., None]
        counts = mask.sum(dim=1)
    scale = 1.0 / counts.clamp(min=1).to(residual.dtype)
    mean_residual = residual.sum(dim=1) * scale[:, None]  # (C, C)
    feature_grad = mean_residual @ weight  # (C, d)
    if not with_classifier:
        return ClassGradients(feature_grad)
    weight_grad = torch.bmm(residual.transpose(1, 2), features) * scale[:, None, None]
    return ClassGradients(feature_grad, weight_grad, mean_residual)


def vector_distance(a: torch.Tensor, b: torch.Tensor, kind: Distance) -> torch.Tensor:
    """Distance per leading index between tensors of shape (N, ..., k).

    cosine: 1 - cos over the last axis, summed over the axes between (per output row,
    as in Dataset Condensation's layer-wise distance); mse: summed squared difference.
    """
    if kind == "cosine":
        per_row = 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)
    elif kind == "mse":
        per_row = (a - b).pow(2).sum(dim=-1)
    else:
        raise ValueError(f"unknown distance '{kind}'; allowed: cosine, mse")
    return per_row.reshape(per_row.shape[0], -1).sum(dim=1)


def masked_class_mean(
    values: torch.Tensor, present: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over clients of per-class values, counting only clients that hold the class.

    Args:
        values: (K, C, ...) one row per client.
        present: (K, C) bool.
    Returns (mean (C, ...), holders (C,) number of clients holding each class). Classes no
    client holds come out as zeros and must be skipped using `holders`.
    """
    expand = (1,) * (values.dim() - 2)
    held = present.reshape(*present.shape, *expand)
    total = torch.where(held, values, torch.zeros((), dtype=values.dtype)).sum(dim=0)
    holders = present.sum(dim=0)
    return total / holders.clamp(min=1).to(values.dtype).reshape(-1, *expand), holders


# (loss, its gradient) at a point: what `descend` follows
LossAndGrad = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def prepared_target(target: torch.Tensor, present: torch.Tensor, kind: Distance
                    ) -> torch.Tensor:
    """A (C, ...) matching target as `distance_and_grad` reads it, computed once per round:
    zero for classes not in `present`; for cosine, unit rows (norm clamped at 1e-12, as
    ``F.cosine_similarity`` does)."""
    keep = present.reshape(-1, *(1,) * (target.dim() - 1))
    if kind == "cosine":
        target = target / target.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    elif kind != "mse":
        raise ValueError(f"no closed-form gradient for distance '{kind}'; allowed: cosine, mse")
    return torch.where(keep, target, torch.zeros((), dtype=target.dtype))


def distance_and_grad(a: torch.Tensor, target: torch.Tensor, present: torch.Tensor,
                      kind: Distance) -> tuple[torch.Tensor, torch.Tensor]:
    """``vector_distance(a[present], b[present], kind).sum()`` and its gradient w.r.t. `a`
    (zero on absent classes), in closed form, for ``target = prepared_target(b, present)``.

    cosine: with unit rows ``a^`` and ``b^``, ``d(1 - cos)/da = (cos a^ - b^) / |a|``. Its
    loss lacks the constant term (the number of present rows, which the caller knows):
    ``-sum cos``. mse: ``2 (a - b)``. Masks, not boolean indexing: no host synchronisation.
    """
    if kind == "cosine":
        a_norm = a.norm(dim=-1, keepdim=True).clamp_(min=1e-12)
        unit = a / a_norm
        cos = (unit * target).sum(dim=-1, keepdim=True)  # 0 on absent rows (target 0)
        return -cos.sum(), (cos * unit - target).div_(a_norm)
    if kind == "mse":
        keep = present.reshape(-1, *(1,) * (a.dim() - 1))
        diff = torch.where(keep, a - target, torch.zeros((), dtype=a.dtype))
        return diff.square().sum(), 2.0 * diff
    raise ValueError(f"no closed-form gradient for distance '{kind}'; allowed: cosine, mse")


def cosine_rows(target: torch.Tensor, present: torch.Tensor) -> int:
    """How many last-axis rows of a (C, ...) target the present classes hold: the constant
    that `distance_and_grad`'s cosine loss leaves out."""
    return int(present.sum()) * (target[0].numel() // target.shape[-1])


def descend(
    start: torch.Tensor,
    loss_and_grad: LossAndGrad,
    steps: int,
    lr: float,
) -> tuple[torch.Tensor, float, float]:
    """Gradient descent from `start` (left as it is): (result, loss at the start, at the end).

    The server's two matching problems (hyper-prototypes, federated features) are both this.
    """
    x = start.detach().clone()
    loss, grad = loss_and_grad(x)
    before = loss.item()
    for i in range(steps):
        if i:
            loss, grad = loss_and_grad(x)
        x.add_(grad, alpha=-lr)
    after = loss_and_grad(x)[0].item() if steps else before
    return x, before, after
