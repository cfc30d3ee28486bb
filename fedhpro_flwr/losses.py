"""FedHPro's client losses: HPCL (inter-class separation) and HPAL (intra-class alignment)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hpcl(
    z: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor, tau: float, margin: float = 0.0
) -> torch.Tensor:
    """Hyper-prototype contrastive loss, averaged over the batch.

    ``-log(exp(zh . a_y / tau) / (sum_c exp(zh . a_c / tau) + margin))`` with ``zh`` the
    normalised feature and ``a_c`` the class anchors. The margin enlarges the denominator,
    so a client whose classes are entangled must separate them further.
    """
    logits = F.normalize(z, dim=1) @ anchors.T / tau
    log_denominator = torch.logsumexp(logits, dim=1)
    if margin > 0.0:
        log_denominator = torch.logaddexp(
            log_denominator, torch.full_like(log_denominator, math.log(margin))
        )
    return (log_denominator - logits.gather(1, y[:, None]).squeeze(1)).mean()


def hpal(z: torch.Tensor, y: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Hyper-prototype alignment loss: SmoothL1 between ``zh`` and its class centre."""
    return F.smooth_l1_loss(F.normalize(z, dim=1), centers[y])


def client_margin(class_means: torch.Tensor, present: torch.Tensor) -> float:
    """``m_k = sum_{i != j} mu_i . mu_j / (C - 1)^2`` over the classes the client holds, >= 0.

    Computed as ``(|sum mu|^2 - sum |mu|^2) / (C - 1)^2``: O(C d) instead of O(C^2 d).
    """
    num_classes = class_means.shape[0]
    if num_classes < 2:
        raise ValueError("the client margin needs at least two classes")
    mu = class_means[present]
    total = mu.sum(dim=0)
    cross = total @ total - (mu * mu).sum()
    return max(cross.item() / (num_classes - 1) ** 2, 0.0)


class RunningClassMeans:
    """Per-class feature means updated from each training batch (no pass over the data).

    Starts from the means measured during gradient extraction and follows the features as
    the model trains, by an exponential moving average with the given momentum.
    """

    def __init__(self, means: torch.Tensor, present: torch.Tensor, momentum: float):
        self.means = means.clone()
        self.present = present.clone()
        self.momentum = momentum

    def update(self, z: torch.Tensor, y: torch.Tensor) -> None:
        num_classes = self.means.shape[0]
        counts = torch.bincount(y, minlength=num_classes)
        sums = torch.zeros_like(self.means).index_add_(0, y, z.detach().to(self.means.dtype))
        in_batch = counts > 0
        batch_means = sums[in_batch] / counts[in_batch, None]
        keep = torch.where(self.present[in_batch], self.momentum, 0.0)[:, None]
        self.means[in_batch] = keep * self.means[in_batch] + (1 - keep) * batch_means
        self.present |= in_batch

    def margin(self) -> float:
        return client_margin(self.means, self.present)
