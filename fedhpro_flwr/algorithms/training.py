"""Local training and evaluation loops shared by every method (plain PyTorch)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.privacy import ClientPrivacy
from fedhpro_flwr.config import TrainConfig
from fedhpro_flwr.data.federated import TensorData

# extra loss term from (features, labels); methods add their regularisers through it
Regulariser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# a batch's loss from (inputs, labels): (the loss to step on, its cross-entropy part)
BatchLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def train_epochs(
    model: Backbone,
    data: TensorData,
    cfg: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    regulariser: Regulariser | None = None,
    max_grad_norm: float | None = None,
    privacy: ClientPrivacy | None = None,
    public_gradient: Callable[[], None] | None = None,
) -> dict[str, float]:
    """SGD for ``cfg.local_epochs`` on CE (+ the regulariser), each step's gradient clipped to
    `max_grad_norm` when given (FedNH's clients), or DP-SGD under `privacy`, with
    `public_gradient` added to its noised gradient (a term no record moves); returns mean
    losses."""

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = model.features(x)
        ce = F.cross_entropy(model.classifier(z), y)
        return (ce if regulariser is None else ce + regulariser(z, y)), ce

    return train_batches(model, data, cfg, generator, device, batch_loss, max_grad_norm,
                         privacy, public_gradient)


def train_batches(
    model: Backbone,
    data: TensorData,
    cfg: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    batch_loss: BatchLoss,
    max_grad_norm: float | None = None,
    privacy: ClientPrivacy | None = None,
    public_gradient: Callable[[], None] | None = None,
) -> dict[str, float]:
    """`train_epochs`' loop on any batch loss: for a loss that needs the inputs themselves
    (MOON runs its frozen models on them); returns mean losses."""
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    x_all, y_all = data.x.to(device), data.y.to(device)
    # summed on the device and read once at the end: no GPU synchronisation per batch
    total = torch.zeros((), dtype=torch.float64, device=device)
    ce_total = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    if privacy is None:
        batches = shuffled_batches(len(data), cfg.batch_size, cfg.local_epochs, generator)
        stepping: AbstractContextManager[torch.optim.Optimizer] = nullcontext(optimizer)
    else:  # per-sample clipping instead of FedNH's clipping of the whole step
        batches = privacy.poisson_batches(len(data), cfg.batch_size, cfg.local_epochs,
                                          generator)
        expected = min(cfg.batch_size, len(data))  # the sample rate times the records
        stepping = privacy.training(model, optimizer, expected, public_gradient)
        max_grad_norm = None
    with stepping as optimizer:
        for batch in batches:
            if privacy is None and len(batch) < 2 and len(data) >= 2:
                continue  # BatchNorm cannot train on a single sample
            if len(batch) == 0:
                continue  # an empty Poisson draw: the accountant counted it as a step
            batch = batch.to(device)
            loss, ce = batch_loss(x_all[batch], y_all[batch])
            optimizer.zero_grad()
            loss.backward()
            if public_gradient is not None and privacy is None:  # (DP: after the noise)
                public_gradient()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            total += loss.detach()
            ce_total += ce.detach()
            steps += 1
    steps = max(steps, 1)
    return {"train_loss": total.item() / steps, "train_ce": ce_total.item() / steps}


def shuffled_batches(n: int, batch_size: int, epochs: int,
                     generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Each epoch, the records in a fresh random order, `batch_size` at a time."""
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def evaluate(
    model: Backbone, data: TensorData, device: torch.device, batch_size: int = 512
) -> tuple[float, float]:
    """(mean CE loss, accuracy) of the model on the data."""
    model.eval()
    loss = correct = 0.0
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(device)
        y = data.y[start : start + batch_size].to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
    n = max(len(data), 1)
    return loss / n, correct / n


@torch.no_grad()
def domain_accuracies(
    model: Backbone, data: TensorData, device: torch.device, batch_size: int = 512
) -> dict[str, float]:
    """``{"accuracy_<domain>": accuracy}`` for multi-domain data; empty otherwise."""
    if data.domain is None:
        return {}
    model.eval()
    correct = torch.zeros(len(data.domains), dtype=torch.float64)
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(device)
        hit = (model(x).argmax(dim=1).cpu() == data.y[start : start + batch_size]).double()
        correct.index_add_(0, data.domain[start : start + batch_size], hit)
    totals = data.domain_counts().clamp(min=1)
    return {f"accuracy_{name}": (correct[d] / totals[d]).item()
            for d, name in enumerate(data.domains)}
