"""FedProto (Tan et al., AAAI 2022): averaged class prototypes as the global signal.

Clients train on CE + lambda * MSE(z, global prototype of y) and upload their class
prototypes with counts. The server averages them per class weighted by the counts (the
paper's rule; its code weighs clients equally), over the clients holding the class only.
This is the global-model variant: the weights are FedAvg'd too.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro_flwr.algorithms.prototypes import weighted_class_mean
from fedhpro_flwr.config import setting
from fedhpro_flwr.methods.base import Method
from fedhpro_flwr.methods.prototype import PrototypeStrategy, prototype_mse_trainer
from fedhpro_flwr.methods.strategy import ClientReply


@dataclass(frozen=True)
class FedProtoConfig:
    """FedProto (Tan et al., AAAI 2022): weight of the prototype MSE (its code's `ld`)."""

    lam: float = setting(1.0, ge=0.0)


class FedProtoStrategy(PrototypeStrategy):
    """Global prototypes = count-weighted, masked per-class means of this round's uploads."""

    # its prototypes: `pooled_classes`
    pools_statistics = True

    def update_prototypes(self, server_round: int, replies: list[ClientReply]) -> dict[str, float]:
        protos, counts = self.stacked(replies)
        mean, self.present = weighted_class_mean(protos, counts)
        self.prototypes = self.pooled_classes(protos, counts > 0, mean)
        return {}


METHOD = Method("fedproto", prototype_mse_trainer(lambda cfg: cfg.section(FedProtoConfig).lam),
                FedProtoStrategy, section=FedProtoConfig, personal_weights=())
