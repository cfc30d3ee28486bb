"""Robust pooling over clients: the coordinate-wise median and trimmed mean, for the model's
weights and for per-class statistics.

The plain average lets one client move the result as far as it likes; these bound the
influence of a minority. Neither is weighted by the clients' counts: a count is itself an
upload, and a client that claims a large one would own a weighted median or a weighted trimmed
mean. So every client is one vote, for the weights (as in Flower's FedMedian and
FedTrimmedAvg) and for a class's statistics, where the voters are the clients holding the class
(count above zero). A trimmed mean drops `int(trim * n)` of the n values at each end of every
coordinate (Flower's `trim_mean`); a median of an even number of values is the mean of the
middle two (numpy's). Both are computed here in torch, the same arithmetic as Flower's and
numpy's (tests/test_robust.py checks it), so that algorithm code stays free of Flower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Rule = Literal["median", "trimmed-mean"]


def pool(values: torch.Tensor, rule: Rule, trim: float = 0.0) -> torch.Tensor:
    """(n, ...) values of n clients pooled over the first dimension by `rule`."""
    n = values.shape[0]
    if n == 0:
        raise ValueError("no values to pool")
    ordered = values.detach().double().sort(dim=0).values
    if rule == "median":
        pooled = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    elif rule == "trimmed-mean":
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim fraction {trim}: must be in [0, 0.5)")
        cut = int(trim * n)
        pooled = ordered[cut:n - cut].mean(dim=0)
    else:
        raise ValueError(f"unknown robust rule '{rule}'; allowed: median, trimmed-mean")
    return pooled.to(values.dtype)


def pool_states(states: Sequence[dict[str, torch.Tensor]], rule: Rule,
                trim: float = 0.0) -> dict[str, torch.Tensor]:
    """State dicts pooled tensor by tensor; integer buffers (BatchNorm counters) rounded back."""
    out = {}
    for name, ref in states[0].items():
        pooled = pool(torch.stack([s[name] for s in states]).double(), rule, trim)
        out[name] = (pooled if ref.is_floating_point() else pooled.round()).to(ref.dtype)
    return out


def pool_classes(values: torch.Tensor, present: torch.Tensor, rule: Rule,
                 trim: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the values of the clients holding it pooled by `rule`.

    Args:
        values: (K, C, ...) one row per client.
        present: (K, C) bool, which client holds which class.
    Returns ((C, ...) pooled values, zeros for a class no client holds; (C,) holders).
    """
    holders = present.sum(dim=0)
    out = torch.zeros(values.shape[1:], dtype=values.dtype)
    for c in torch.nonzero(holders).flatten().tolist():
        out[c] = pool(values[present[:, c], c], rule, trim)
    return out, holders


@dataclass(frozen=True)
class Pooling:
    """A robust rule and its trim fraction, as the server applies it to every upload."""

    rule: Rule
    trim: float = 0.0

    @staticmethod
    def of(rule: str, trim: float) -> Pooling | None:
        """The configured rule; None for "mean", each method's own average."""
        return None if rule == "mean" else Pooling(rule, trim)  # type: ignore[arg-type]

    def states(self, states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return pool_states(states, self.rule, self.trim)

    def classes(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(K, C, ...) per-class values pooled over each class's holders (`present`, (K, C))."""
        return pool_classes(values, present, self.rule, self.trim)[0]
