"""Client loss terms added to cross-entropy.

FedHPro's HPCL (inter-class separation) and HPAL (intra-class alignment), and the peers':
FedProx's proximal term, FedProto's / FedTGP's prototype MSE, FPL's cluster InfoNCE.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def hpcl(
    zh: torch.Tensor,
    y: torch.Tensor,
    anchors: torch.Tensor,
    tau: float,
    margin: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Hyper-prototype contrastive loss, averaged over the batch.

    ``-log(exp(zh . a_y / tau) / (sum_c exp(zh . a_c / tau) + margin))`` with ``zh`` the
    normalised features and ``a_c`` the class anchors. The margin enlarges the denominator,
    so a client whose classes are entangled must separate them further. A tensor margin
    stays on the device (no synchronisation per batch); 0 adds nothing.
    """
    logits = zh @ anchors.T / tau
    log_denominator = torch.logsumexp(logits, dim=1)
    if isinstance(margin, torch.Tensor) or margin > 0.0:
        log_margin = torch.log(torch.as_tensor(margin, dtype=logits.dtype, device=logits.device))
        log_denominator = torch.logaddexp(log_denominator, log_margin)
    return (log_denominator - logits.gather(1, y[:, None]).squeeze(1)).mean()


def hpal(zh: torch.Tensor, y: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Hyper-prototype alignment loss: SmoothL1 between the normalised features ``zh`` and
    their class centres."""
    return F.smooth_l1_loss(zh, centers[y])


def client_margin(class_means: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``m_k = sum_{i != j} mu_i . mu_j / (C - 1)^2`` over the classes the client holds, >= 0.

    Computed as ``(|sum mu|^2 - sum |mu|^2) / (C - 1)^2``: O(C d) instead of O(C^2 d). A 0-d
    tensor on the means' device.
    """
    num_classes = class_means.shape[0]
    if num_classes < 2:
        raise ValueError("the client margin needs at least two classes")
    mu = class_means * present[:, None]
    total = mu.sum(dim=0)
    cross = total @ total - (mu * mu).sum()
    return (cross / (num_classes - 1) ** 2).clamp(min=0.0)


class RunningClassMeans:
    """Per-class feature means updated from each training batch (no pass over the data).

    Starts from the means measured during gradient extraction and follows the features as
    the model trains, by an exponential moving average with the given momentum. Written with
    dense operations only, so that a GPU never waits on the host during training.
    """

    def __init__(self, means: torch.Tensor, present: torch.Tensor, momentum: float):
        self.means = means.clone()
        self.present = present.clone()
        self.momentum = momentum

    def update(self, z: torch.Tensor, y: torch.Tensor) -> None:
        z = z.detach().to(self.means.dtype)
        counts = torch.zeros(len(self.means), dtype=z.dtype, device=z.device)
        counts.index_add_(0, y, torch.ones_like(y, dtype=z.dtype))
        sums = torch.zeros_like(self.means).index_add_(0, y, z)
        in_batch = counts > 0
        batch_means = sums / counts.clamp(min=1)[:, None]
        keep = torch.where(self.present, self.momentum, 0.0)[:, None]
        updated = keep * self.means + (1 - keep) * batch_means
        self.means = torch.where(in_batch[:, None], updated, self.means)
        self.present |= in_batch

    def margin(self) -> torch.Tensor:
        return client_margin(self.means, self.present)


def proximal_term(
    params: Iterable[torch.Tensor], global_params: Iterable[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx: ``mu / 2 * ||w - w_global||^2`` over all trainable parameters."""
    squares = [(p - g).pow(2).sum() for p, g in zip(params, global_params, strict=True)]
    return 0.5 * mu * torch.stack(squares).sum()


def prototype_mse(
    z: torch.Tensor, y: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """FedProto / FedTGP: MSE between each feature and its class's global prototype.

    Averaged over all B x d entries, as their code's ``MSELoss`` over a target in which
    samples of classes without a global prototype stand for themselves (and add zero).
    """
    has_proto = present[y]
    diff = (z - prototypes[y]) * has_proto[:, None]
    return diff.pow(2).sum() / z.numel()


def fpl_loss(
    z: torch.Tensor,
    y: torch.Tensor,
    cluster_prototypes: torch.Tensor,
    cluster_labels: torch.Tensor,
    unbiased: torch.Tensor,
    present: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """FPL's prototype term, averaged over the batch.

    Per sample of a class with global prototypes: InfoNCE over all cluster prototypes,
    ``-log(sum_pos exp(cos/tau) / sum_all exp(cos/tau))`` with the sample's class clusters as
    positives, plus the MSE (mean over d) to its class's unbiased prototype. Samples of other
    classes add zero but count in the batch mean, as in FPL's code.
    """
    has_proto = present[y]
    if not has_proto.any():
        return z.sum() * 0.0
    zs, ys = z[has_proto], y[has_proto]
    logits = F.cosine_similarity(zs[:, None, :], cluster_prototypes[None], dim=-1) / tau
    positive = cluster_labels[None, :] == ys[:, None]
    log_positive = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    infonce = torch.logsumexp(logits, dim=1) - log_positive
    mse = (zs - unbiased[ys]).pow(2).mean(dim=1)
    return (infonce + mse).sum() / len(y)
