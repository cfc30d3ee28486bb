"""FedTGP (Zhang et al., AAAI 2024): global prototypes trained on the server.

Clients are FedProto's (CE + lambda * MSE to the global prototypes, lambda 10, then upload
class prototypes). The server fits `PrototypeGenerator` to the uploaded (prototype, class)
pairs for `server_epochs` with the adaptive margin min(largest class gap, threshold) and
sends its outputs for every class. The weights are FedAvg'd (the global-model variant).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedhpro_flwr.algorithms.gradmatch import masked_class_mean
from fedhpro_flwr.algorithms.tgp import PrototypeGenerator, class_gap_margin, train_generator
from fedhpro_flwr.config import ExperimentConfig, setting
from fedhpro_flwr.methods.base import Method
from fedhpro_flwr.methods.prototype import PrototypeStrategy, prototype_mse_trainer
from fedhpro_flwr.methods.strategy import ClientReply, checked_state


@dataclass(frozen=True)
class FedTGPConfig:
    """FedTGP (Zhang et al., AAAI 2024); 0 means "as its code does": follow the train section."""

    lam: float = setting(10.0, ge=0.0)
    server_epochs: int = setting(100, ge=0)
    margin_threshold: float = setting(100.0, ge=0.0)
    server_lr: float = setting(0.0, ge=0.0)  # 0 = train.lr
    server_batch_size: int = setting(0, ge=0)  # 0 = train.batch_size
    hidden_dim: int = setting(0, ge=0)  # 0 = the feature dimension


class FedTGPStrategy(PrototypeStrategy):
    """Trains the prototype generator every round; its outputs are the global prototypes."""

    def __init__(self, cfg: ExperimentConfig, reference_state: Mapping[str, torch.Tensor],
                 num_classes: int, feature_dim: int):
        super().__init__(cfg, reference_state, num_classes, feature_dim)
        tgp = cfg.section(FedTGPConfig)
        with torch.random.fork_rng():  # the same generator whatever ran before
            torch.manual_seed(cfg.seed)
            self.prototype_generator = PrototypeGenerator(num_classes, feature_dim,
                                            tgp.hidden_dim or feature_dim)
        self.lr = tgp.server_lr or cfg.train.lr
        self.batch_size = tgp.server_batch_size or cfg.train.batch_size
        self.rng = torch.Generator().manual_seed(cfg.seed)

    def update_prototypes(self, server_round: int, replies: list[ClientReply]) -> dict[str, float]:
        tgp = self.cfg.section(FedTGPConfig)
        protos, counts = self.stacked(replies)
        held = counts > 0
        class_means, holders = masked_class_mean(protos, held)  # plain mean, as FedTGP
        margin = class_gap_margin(class_means, holders > 0, tgp.margin_threshold)
        client_index, labels = torch.nonzero(held, as_tuple=True)
        before, after = train_generator(
            self.prototype_generator, protos[client_index, labels], labels, margin,
            epochs=tgp.server_epochs, lr=self.lr, batch_size=self.batch_size, generator=self.rng,
        )
        with torch.no_grad():
            self.prototypes = self.prototype_generator().detach().clone()
        self.present = torch.ones(self.num_classes, dtype=torch.bool)
        return {"tgp_margin": margin, "tgp_loss_before": before, "tgp_loss_after": after}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator_model": self.prototype_generator.state_dict(),
                "generator": self.rng.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        model_state = state.get("generator_model")
        if not isinstance(model_state, Mapping):
            raise ValueError("checkpoint lacks FedTGP's 'generator_model'")
        self.prototype_generator.load_state_dict(
            checked_state(model_state, self.prototype_generator.state_dict()))
        self.rng.set_state(state["generator"])


METHOD = Method("fedtgp", prototype_mse_trainer(lambda cfg: cfg.section(FedTGPConfig).lam),
                FedTGPStrategy, section=FedTGPConfig, personal_weights=())
