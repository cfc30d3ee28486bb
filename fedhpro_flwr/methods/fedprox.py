"""FedProx (Li et al., MLSys 2020), as Flower's built-in `FedProx` strategy sends it.

The server puts ``proximal-mu`` in every training message's config, under Flower's key; the
client adds ``mu / 2 * ||w - w_global||^2`` to its loss. Aggregation is FedAvg's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedhpro_flwr.algorithms.losses import proximal_term
from fedhpro_flwr.algorithms.training import train_epochs
from fedhpro_flwr.config import ExperimentConfig, setting
from fedhpro_flwr.methods.base import ClientTask, Method
from fedhpro_flwr.methods.payload import PayloadError, RecordKeys
from fedhpro_flwr.methods.strategy import ClientReply, ExperimentStrategy, mean_metric

MU_KEY = "proximal-mu"  # where Flower's FedProx puts mu, and so this strategy


@dataclass(frozen=True)
class FedProxConfig:
    """FedProx (Li et al., MLSys 2020): the proximal term's weight mu."""

    mu: float = setting(0.01, ge=0.0)


def client_train(task: ClientTask) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
    """CE plus the proximal term to the global weights received this round."""
    mu = task.content.config_records[RecordKeys.of(task.content).config].get(MU_KEY)
    if not isinstance(mu, int | float) or not math.isfinite(mu) or mu < 0:
        raise PayloadError(f"training config's '{MU_KEY}' must be a finite number >= 0 "
                           f"(the FedProx server sends it), got {mu!r}")
    params = list(task.model.parameters())
    global_params = [p.detach().clone() for p in params]
    terms: list[float] = []

    def regulariser(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        term = proximal_term(params, global_params, mu)
        terms.append(term.item())
        return term

    if task.privacy is not None:  # DP-SGD sees per-record gradients only; the pull to the global
        # weights, which no record moves, joins its noised gradient instead of the loss
        @torch.no_grad()
        def proximal_pull() -> None:
            for param, start in zip(params, global_params, strict=True):
                param.grad.add_(param - start, alpha=mu)

        return {}, train_epochs(task.model, task.data, task.cfg.train, task.generator,
                                task.device, privacy=task.privacy, public_gradient=proximal_pull)
    metrics = train_epochs(task.model, task.data, task.cfg.train, task.generator, task.device,
                           regulariser)
    metrics["proximal_term"] = sum(terms) / max(len(terms), 1)
    return {}, metrics


class FedProxStrategy(ExperimentStrategy):
    """FedAvg that sends mu, as Flower's `FedProx.configure_train` does (that one cannot
    be chained: `ExperimentStrategy` samples the nodes itself)."""

    def __init__(self, cfg: ExperimentConfig, reference_state: Mapping[str, torch.Tensor]):
        super().__init__(cfg, reference_state)
        self.proximal_mu = cfg.section(FedProxConfig).mu

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config[MU_KEY] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)

    def server_step(self, server_round: int, weights: dict[str, torch.Tensor],
                    replies: list[ClientReply]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return weights, {"proximal_term": mean_metric(replies, "proximal_term")}


METHOD = Method("fedprox", client_train, lambda cfg, ref, _c, _d: FedProxStrategy(cfg, ref),
                section=FedProxConfig)
