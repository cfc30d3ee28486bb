"""A client's own trained model, kept between its rounds for the methods that train against it
(MOON's previous model), the way personal models are kept (`sharing.PersonalModels`).

A SuperNode starts a fresh ClientApp process for every message, and Flower keeps the node's
`context.state` only while the SuperNode process lives and only for one Flower run. So the
model goes to both: the context state, read first, and the node's disk
(`<data.root>/personal-models/<experiment id>/`, `personal_store`), which is what a restarted
SuperNode and a resumed run (a new Flower run) find. The disk copy read is the newest from a
round before this one: a run resumed from an earlier checkpoint replays the round with the
model the client had then.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord
from flwr.common.logger import log

from fedhpro_flwr.app.personal_store import PersonalModelStore
from fedhpro_flwr.app.sharing import NodeMemory
from fedhpro_flwr.config import ExperimentConfig
from fedhpro_flwr.methods.payload import tensors_to_record

KEPT_MODEL = "kept-model"  # the weights, in the node's context state
KEPT_ROUND = "kept-round"  # the round they were trained in


@dataclass(frozen=True)
class NodeKeptModel:
    """One client's kept model in one experiment (`methods.base.KeptModel`)."""

    cfg: ExperimentConfig
    memory: NodeMemory
    partition_id: int

    @property
    def store(self) -> PersonalModelStore:
        # beside a personal model (FedSA's last prototypes with model.backbones) in a folder
        # of its own, `<experiment id>-kept/`: the personal model's files are named alike
        folder = self.memory.experiment_id + ("-kept" if self.cfg.model.backbone_list() else "")
        return PersonalModelStore(self.cfg, folder, self.partition_id)

    def load(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        state, server_round = self.memory.state, self.memory.server_round
        if KEPT_MODEL in state.array_records:
            kept_round = int(state.config_records[KEPT_ROUND]["round"])
            if kept_round < server_round:
                return kept_round, state.array_records[KEPT_MODEL].to_torch_state_dict()
        store = self.store
        round_ = store.newest(server_round - 1)
        if round_ is None:
            return None
        path = store.path(round_)
        raw = path.read_bytes()
        log(INFO, "partition %d continues from its model of round %d on disk: %s (sha256 %s)",
            self.partition_id, round_, path, hashlib.sha256(raw).hexdigest())
        return round_, torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)

    def save(self, state: Mapping[str, torch.Tensor]) -> None:
        server_round = self.memory.server_round
        self.memory.state[KEPT_MODEL] = tensors_to_record(state)
        self.memory.state[KEPT_ROUND] = ConfigRecord({"round": server_round})
        store = self.store
        try:
            store.save(server_round, dict(state))
        except OSError as exc:  # a read-only or full disk: the run goes on, a resume would not
            log(WARNING, "model of round %d not saved to %s (%s); a restarted node or a resumed "
                "run could not continue it", server_round, store.folder, exc)
