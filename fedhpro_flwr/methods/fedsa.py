"""FedSA, semantic anchors (AAAI 2025; official code lokinko/FedSA, on PFLlib).

The server holds one semantic anchor per class (`anchors.semantic_anchors`, seeded from the
experiment seed) and sends them every round. A client trains on CE plus three anchor terms
(`anchors.fedsa_loss`): the head calibrated on the anchors, its features pulled to their
class's anchor, and a contrastive term with the margin max(local gap, global gap), the local
gap measured on the prototypes it uploaded in its last round (kept on its node between rounds,
`ClientTask.kept`, as MOON's previous model is) and the global one on the anchors. It uploads
its class prototypes with counts. The server averages them per class over the clients holding
the class, unweighted (FedSA's code), keeps them (the nearest-prototype accuracy) and moves
the anchors by ``a <- momentum * a + (1 - momentum) * p`` (0.9999: nearly fixed anchors).

FedSA is model-heterogeneous by design: with `model.backbones` nothing but the prototypes
leaves a client (`personal_weights=()`). Without, the weights are FedAvg'd as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedhpro_flwr.algorithms.anchors import (
    calibration_loss,
    class_gap,
    fedsa_loss,
    margin_gap,
    move_anchors,
    semantic_anchors,
)
from fedhpro_flwr.algorithms.diagnostics import consistency_metric
from fedhpro_flwr.algorithms.gradmatch import masked_class_mean
from fedhpro_flwr.algorithms.prototypes import local_prototypes
from fedhpro_flwr.algorithms.training import train_batches
from fedhpro_flwr.config import ExperimentConfig, setting
from fedhpro_flwr.methods.base import ClientTask, Method
from fedhpro_flwr.methods.payload import (
    encode_class_rows,
    record_to_tensors,
    required_record,
    tensors_to_record,
)
from fedhpro_flwr.methods.prototype import LOCAL_RECORD, PrototypeStrategy
from fedhpro_flwr.methods.strategy import ClientReply, checked_state, mean_metric

ANCHOR_RECORD = "semantic-anchors"
# the round of the client's own prototypes its local gap came from; 0: none, the global gap
PREVIOUS_ROUND = "fedsa_previous_round"


@dataclass(frozen=True)
class FedSAConfig:
    """FedSA (AAAI 2025): the weights of its three anchor terms at its code's defaults
    (system/main.py) and the anchors' momentum (serversa.py's 0.9999)."""

    cc: float = setting(1.0, ge=0.0)  # classifier calibration on the anchors
    lam: float = setting(1.0, ge=0.0)  # MSE of the features to their class's anchor
    mcl: float = setting(1.0, ge=0.0)  # margin-enhanced contrastive term
    anchor_momentum: float = setting(0.9999, ge=0.0, le=1.0)


def received_anchors(task: ClientTask) -> torch.Tensor:
    """The server's (C, d) anchors, checked, on the device."""
    shape = (task.data.num_classes, task.model.feature_dim)
    record = required_record(task.content, ANCHOR_RECORD)
    return record_to_tensors(record, {"anchors": (shape, "float")},
                             "semantic anchors")["anchors"].to(task.device)


def last_prototypes(task: ClientTask) -> tuple[int, torch.Tensor] | None:
    """(round, the rows of the classes it held) of the prototypes the client uploaded when it
    last trained, from its node; None before its first round (or without a node)."""
    kept = task.kept.load() if task.kept is not None else None
    if kept is None:
        return None
    round_, state = kept
    shape = (task.data.num_classes, task.model.feature_dim)
    protos, counts = state.get("prototypes"), state.get("counts")
    if (not isinstance(protos, torch.Tensor) or not isinstance(counts, torch.Tensor)
            or protos.shape != shape or counts.shape != shape[:1]):
        raise ValueError(f"the client's kept FedSA prototypes of round {round_} are not "
                         f"(prototypes {shape}, counts {shape[:1]}): {sorted(state)}")
    return round_, protos[counts > 0].to(task.device)


def client_train(task: ClientTask) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
    """CE plus FedSA's three anchor terms; then upload the class prototypes and keep them for
    the next round's local gap."""
    fedsa = task.cfg.section(FedSAConfig)
    anchors = received_anchors(task)
    previous = last_prototypes(task)
    gap = margin_gap(None if previous is None else previous[1], anchors)
    model = task.model

    # DP-SGD sees per-record gradients only: the head's calibration on the anchors, which no
    # record moves, joins its noised gradient instead of the loss
    cc = fedsa.cc if task.privacy is None else 0.0

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fedsa_loss(model.features(x), y, model.classifier, anchors, gap,
                          cc=cc, lam=fedsa.lam, mcl=fedsa.mcl)

    def calibration_pull() -> None:
        head = list(model.classifier.parameters())
        grads = torch.autograd.grad(calibration_loss(model.classifier, anchors), head)
        with torch.no_grad():
            for param, grad in zip(head, grads, strict=True):
                param.grad.add_(grad, alpha=fedsa.cc)

    metrics = train_batches(model, task.data, task.cfg.train, task.generator, task.device,
                            batch_loss, privacy=task.privacy,
                            public_gradient=None if task.privacy is None else calibration_pull)
    protos, counts = local_prototypes(model, task.data, task.device, task.privacy)
    if task.kept is not None:
        task.kept.save({"prototypes": protos, "counts": counts})
    everywhere = torch.ones(len(anchors), dtype=torch.bool, device=task.device)
    if task.cfg.diagnostics.consistency:
        metrics |= consistency_metric(protos, counts > 0, anchors, everywhere)
    records = {LOCAL_RECORD: encode_class_rows(counts > 0, {"prototypes": protos}, counts)}
    return records, metrics | {"fedsa_gap": gap,
                               PREVIOUS_ROUND: 0.0 if previous is None else float(previous[0])}


class FedSAStrategy(PrototypeStrategy):
    """Holds the semantic anchors beside the averaged prototypes; sends the anchors."""

    # its prototypes, and so the anchors they move: `pooled_classes`
    pools_statistics = True

    def __init__(self, cfg: ExperimentConfig, reference_state: Mapping[str, torch.Tensor],
                 num_classes: int, feature_dim: int):
        super().__init__(cfg, reference_state, num_classes, feature_dim)
        self.anchors = semantic_anchors(num_classes, feature_dim, cfg.seed)

    def train_records(self) -> dict[str, ArrayRecord]:
        return {ANCHOR_RECORD: tensors_to_record({"anchors": self.anchors})}

    def update_prototypes(self, server_round: int, replies: list[ClientReply]) -> dict[str, float]:
        protos, counts = self.stacked(replies)
        mean, holders = masked_class_mean(protos, counts > 0)  # unweighted
        self.prototypes = self.pooled_classes(protos, counts > 0, mean)
        self.present = holders > 0
        self.anchors = move_anchors(self.anchors, self.prototypes, self.present,
                                    self.cfg.section(FedSAConfig).anchor_momentum)
        return {"fedsa_global_gap": class_gap(self.anchors),
                "fedsa_gap": mean_metric(replies, "fedsa_gap"),
                "fedsa_local_gaps": float(sum(r.metrics.get(PREVIOUS_ROUND, 0.0) > 0
                                              for r in replies))}

    def global_anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.anchors, torch.ones(self.num_classes, dtype=torch.bool)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "anchors": self.anchors}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.anchors = checked_state(state, {"anchors": self.anchors})["anchors"]


METHOD = Method("fedsa", client_train, FedSAStrategy, section=FedSAConfig, personal_weights=())
