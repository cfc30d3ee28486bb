"""Record-level differential privacy of everything a client sends.

Two datasets are neighbours when one holds one record more (add/remove). A client's reply
releases its weights and its class statistics, and each goes through a Gaussian mechanism:

- the weights come from DP-SGD (Opacus's per-sample clipping and noise) on Poisson-sampled
  batches, `noise_multiplier` times `max_grad_norm`;
- each class statistic is a sum over the class's records of per-record parts, each part
  clipped to `stats_clip` in L2, with Gaussian noise of `stats_noise` times the record's
  bound on every class (absent ones too); the class counts are a release of their own
  (sensitivity 1). Means are post-processing: noisy sum / noisy count.

A client reports what it spent in its metrics (`reply_metrics`); the server's
`PrivacyLedger` composes each client's spending with Opacus's RDP accountant. Opacus is
imported where it is used, so a run without privacy never loads it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from fedhpro_flwr.config import PrivacyConfig

SGD_STEPS, SAMPLE_RATE, RELEASES = "dp-sgd-steps", "dp-sample-rate", "dp-releases"
# training metrics that are statistics of the training records outside the mechanisms above:
# a private reply leaves them out (the server then logs no training loss)
WITHHELD_METRICS = frozenset({"train_loss", "train_ce", "margin", "model_contrastive"})
# a class counts as held when its noisy count exceeds this many standard deviations of the
# count noise: a class the client lacks is then reported with probability 0.13%
PRESENT_SIGMAS = 3.0


def sgd_schedule(examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """DP-SGD's (sample rate, steps) for a round: each record joins a step with probability
    batch_size / examples, for as many steps as epochs of fixed batches take."""
    return min(1.0, batch_size / max(examples, 1)), epochs * math.ceil(examples / batch_size)


def clip_rows(values: torch.Tensor, bound: float) -> torch.Tensor:
    """Each row scaled down to L2 norm at most `bound` (rows within it are kept)."""
    norms = values.norm(dim=1, keepdim=True)
    return values * (bound / norms.clamp(min=bound))


@dataclass(frozen=True)
class ClassRelease:
    """Noisy per-class means of record parts, and the noisy counts they were divided by."""

    means: list[torch.Tensor]  # one (C, k) tensor per part; rows of absent classes are zeros
    counts: torch.Tensor  # (C,) int64, 0 for the classes not reported
    present: torch.Tensor  # (C,) bool


@dataclass
class ClientPrivacy:
    """One client's privacy for one round: its noise, and what it has released so far."""

    cfg: PrivacyConfig
    noise: torch.Generator  # every Gaussian draw; seeded, so runs stay reproducible
    sgd_steps: int = 0
    sample_rate: float = 0.0
    releases: int = 0

    @staticmethod
    def of(cfg: PrivacyConfig, generator: torch.Generator) -> ClientPrivacy | None:
        """The round's privacy when it is on, its noise seeded from `generator`."""
        if not cfg.enabled:
            return None
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return ClientPrivacy(cfg, torch.Generator().manual_seed(seed))

    def poisson_batches(self, n: int, batch_size: int, epochs: int,
                        generator: torch.Generator) -> Iterator[torch.Tensor]:
        """DP-SGD's batches, Poisson-sampled as the accountant assumes (`sgd_schedule`);
        counted as spent when asked for."""
        rate, steps = sgd_schedule(n, batch_size, epochs)
        if self.sgd_steps and rate != self.sample_rate:
            raise ValueError("a round's DP-SGD steps are reported under one sample rate")
        self.sample_rate, self.sgd_steps = rate, self.sgd_steps + steps
        return (torch.nonzero(torch.rand(n, generator=generator) < rate).flatten()
                for _ in range(steps))

    @contextmanager
    def training(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 expected_batch: int, public_gradient: Callable[[], None] | None = None
                 ) -> Iterator[torch.optim.Optimizer]:
        """`optimizer` as Opacus's DP optimizer over `model`, whose layers record per-sample
        gradients meanwhile (their hooks go at the end). `public_gradient` adds to the
        noised gradient what no record moves (FedProx's pull to the global weights), which
        Opacus's per-sample gradients leave out."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        sampled = GradSampleModule(model, loss_reduction="mean")
        private = DPOptimizer(optimizer, noise_multiplier=self.cfg.noise_multiplier,
                              max_grad_norm=self.cfg.max_grad_norm,
                              expected_batch_size=expected_batch, generator=self.noise)
        if public_gradient is not None:
            def add_public(_: DPOptimizer) -> None:
                sampled.disable_hooks()  # no batch of records: no per-sample pass
                public_gradient()
                sampled.enable_hooks()

            private.attach_step_hook(add_public)
        try:
            with warnings.catch_warnings():  # Opacus's hooks, as expected: the inputs need
                # no gradient, and the noised gradients are new tensors
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                warnings.filterwarnings("ignore", message="grad and param do not obey")
                yield private
        finally:
            sampled.zero_grad(set_to_none=True)
            sampled.remove_hooks()

    def class_sums(self, num_classes: int) -> ClassSums:
        """An empty accumulator of per-class record parts, released by this client's noise."""
        return ClassSums(self, num_classes)

    def gaussian(self, shape: torch.Size, std: float) -> torch.Tensor:
        return torch.normal(0.0, std, tuple(shape), generator=self.noise, dtype=torch.float64)

    def reply_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """A trainer's metrics as a private reply sends them: less `WITHHELD_METRICS`, plus
        what this round released, which the server's ledger composes."""
        kept = {k: v for k, v in metrics.items() if k not in WITHHELD_METRICS}
        return kept | {SGD_STEPS: float(self.sgd_steps), SAMPLE_RATE: self.sample_rate,
                       RELEASES: float(self.releases)}


class ClassSums:
    """Per-class sums of record parts, each part of a record clipped to `stats_clip`, added
    chunk by chunk; `release` noises them once (one Gaussian release for the sums, one for
    the counts) and divides."""

    def __init__(self, privacy: ClientPrivacy, num_classes: int):
        self.privacy = privacy
        self.sums: list[torch.Tensor] = []
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def add(self, parts: list[torch.Tensor], labels: torch.Tensor) -> None:
        """Records' parts, each (N, k_j), of classes `labels` (N,)."""
        labels = labels.cpu()
        bound = self.privacy.cfg.stats_clip
        if not self.sums:
            self.sums = [torch.zeros(len(self.counts), p.shape[1], dtype=torch.float64)
                         for p in parts]
        for total, part in zip(self.sums, parts, strict=True):
            total.index_add_(0, labels, clip_rows(part.detach().cpu().double(), bound))
        self.counts += torch.bincount(labels, minlength=len(self.counts)).double()

    def noised(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The two Gaussian releases: the sums, and the counts (sensitivity 1)."""
        privacy = self.privacy
        bound, sigma = privacy.cfg.stats_clip, privacy.cfg.stats_noise
        # one record moves the concatenated sums by at most bound * sqrt(parts) in L2
        std = sigma * bound * math.sqrt(len(self.sums))
        privacy.releases += 2
        return ([total + privacy.gaussian(total.shape, std) for total in self.sums],
                self.counts + privacy.gaussian(self.counts.shape, sigma))

    def release(self) -> ClassRelease:
        """The per-class means as released: post-processing of `noised`."""
        sums, counts = self.noised()
        present = counts > PRESENT_SIGMAS * self.privacy.cfg.stats_noise
        held = counts.clamp(min=1.0)[:, None]
        means = [torch.where(present[:, None], total / held, 0.0).float() for total in sums]
        reported = torch.where(present, counts.round().clamp(min=1.0), 0.0).long()
        return ClassRelease(means, reported, present)


class PrivacyLedger:
    """Each client's privacy loss over the run: the Gaussian mechanisms it reported, composed
    by Opacus's RDP accountant into (epsilon, `delta`)."""

    def __init__(self, cfg: PrivacyConfig, saved: Mapping[str, Any] | None = None):
        self.cfg = cfg
        # per client: (noise multiplier, sample rate) -> steps; Renyi DP adds up over steps
        # whatever their order, so a run's history is a few totals however long it is
        self.histories: dict[int, dict[tuple[float, float], int]] = {}
        for partition, client in (saved or {}).get("clients", {}).items():
            self.histories[int(partition)] = {(float(s), float(q)): int(k)
                                              for s, q, k in client["history"]}

    def spend(self, partition: int, metrics: Mapping[str, float]) -> None:
        """Add one reply's DP-SGD steps and statistic releases."""
        history = self.histories.setdefault(partition, {})
        steps, releases = int(metrics.get(SGD_STEPS, 0)), int(metrics.get(RELEASES, 0))
        for mechanism, count in (((self.cfg.noise_multiplier, float(metrics.get(SAMPLE_RATE, 0))),
                                  steps), ((self.cfg.stats_noise, 1.0), releases)):
            if count:
                history[mechanism] = history.get(mechanism, 0) + count

    def epsilon(self, partition: int) -> float:
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(sigma, rate, steps) for (sigma, rate), steps
                              in self.histories.get(partition, {}).items()]
        return float(accountant.get_epsilon(self.cfg.delta)) if accountant.history else 0.0

    def worst(self) -> float:
        """The largest epsilon of any client: the guarantee every data owner has."""
        return max((self.epsilon(p) for p in self.histories), default=0.0)

    def to_json(self) -> dict[str, Any]:
        epsilons = {p: self.epsilon(p) for p in sorted(self.histories)}
        return {"delta": self.cfg.delta, "epsilon": max(epsilons.values(), default=0.0),
                "clients": {str(p): {"epsilon": epsilon,
                                     "history": [[*m, k] for m, k in self.histories[p].items()]}
                            for p, epsilon in epsilons.items()}}


def run_epsilon(sigma: float, delta: float, sizes: Iterable[int], batch_size: int,
                epochs: int, rounds: int, releases: int, stats_ratio: float = 1.0) -> float:
    """The largest epsilon any client of these record counts spends over `rounds` rounds, all
    of them trained, at noise multiplier `sigma` for DP-SGD and `stats_ratio * sigma` for the
    statistics, with `releases` statistic releases a round (2 for the methods that upload class
    statistics, 0 for the weights-only ones)."""
    cfg = PrivacyConfig(noise_multiplier=sigma, stats_noise_multiplier=stats_ratio * sigma,
                        delta=delta)
    ledger = PrivacyLedger(cfg)
    for client, n in enumerate(sorted(set(sizes))):
        rate, steps = sgd_schedule(n, batch_size, epochs)
        for _ in range(rounds):
            ledger.spend(client, {SGD_STEPS: steps, SAMPLE_RATE: rate, RELEASES: releases})
    return ledger.worst()


def noise_for_epsilon(target: float, delta: float, sizes: Iterable[int], batch_size: int,
                      epochs: int, rounds: int, releases: int, stats_ratio: float = 1.0) -> float:
    """The noise multiplier at which `run_epsilon` is `target` (within 0.5%, never above it):
    what to set `privacy.noise_multiplier` to for a budget (and `stats_noise_multiplier` to
    `stats_ratio` times it)."""
    sizes = list(sizes)

    def spent(sigma: float) -> float:
        return run_epsilon(sigma, delta, sizes, batch_size, epochs, rounds, releases,
                           stats_ratio)

    low, high = 0.05, 1.0
    while spent(high) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 keeps epsilon at {target}")
    while spent(low) <= target and low > 1e-3:
        low /= 2
    while high / low > 1.005:  # the epsilon falls as the noise grows: bisect the ratio
        middle = math.sqrt(low * high)
        low, high = (low, middle) if spent(middle) <= target else (middle, high)
    return high
