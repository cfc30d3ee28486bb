"""FedTGP's trainable global prototypes (Zhang et al., AAAI 2024), in plain PyTorch.

The server learns the global prototypes instead of averaging them: a class embedding fed
through a small MLP, trained on the clients' prototypes to classify them by distance, with an
adaptive margin that pushes each class's prototype away from the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeGenerator(nn.Module):
    """Class id -> embedding (d) -> Linear(d, hidden) -> ReLU -> Linear(hidden, d)."""

    def __init__(self, num_classes: int, dim: int, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, dim)
        self.middle = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, dim)

    def forward(self) -> torch.Tensor:
        """(C, d): every class's global prototype."""
        return self.out(self.middle(self.embedding.weight))


def class_gap_margin(class_means: torch.Tensor, present: torch.Tensor, threshold: float) -> float:
    """FedTGP's adaptive margin: min(largest class gap, threshold).

    A class's gap is the L2 distance from its mean prototype to the nearest other class's;
    classes without a gap (absent, or alone) take the smallest gap found.
    """
    means = class_means[present]
    if len(means) < 2:
        return threshold
    distances = torch.cdist(means, means)
    distances.fill_diagonal_(float("inf"))
    gaps = distances.min(dim=1).values
    return min(gaps.max().item(), threshold)


def generator_loss(
    generated: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, margin: float
) -> torch.Tensor:
    """CE over ``-(||p - g_c||_2 + margin * [c = y])``: the own class must win by the margin."""
    distance = torch.cdist(prototypes, generated)
    distance = distance + margin * F.one_hot(labels, generated.shape[0]).to(distance.dtype)
    return F.cross_entropy(-distance, labels)


def train_generator(
    model: PrototypeGenerator,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[float, float]:
    """SGD on `generator_loss` over the uploaded (prototype, class) pairs, shuffled each
    epoch. Returns the loss over all pairs before and after training."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def full_loss() -> float:
        with torch.no_grad():
            return generator_loss(model(), prototypes, labels, margin).item()

    before = full_loss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            batch = order[start : start + batch_size]
            loss = generator_loss(model(), prototypes[batch], labels[batch], margin)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return before, full_loss()
