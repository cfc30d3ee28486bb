"""Personal models on the node's disk, so that a resumed run's clients continue their own.

Flower keeps a node's `context.state` for one Flower run, and a resumed experiment is a new
run: without a copy elsewhere every client of a heterogeneous run would start afresh. After
each round a client also writes its model to `<data.root>/personal-models/<experiment id>/`
on its own machine, keeping the client's last two (the server may have died after the clients
trained a round it never checkpointed); a resumed run reads the model of the checkpoint's
round (or, for a client not sampled then, the last it trained). Delete the folder to reclaim
the space of finished experiments.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from fedhpro_flwr.config import ExperimentConfig

STORE_DIR = "personal-models"
KEPT_ROUNDS = 2


class PersonalModelStore:
    """One client's saved models in one experiment, by round."""

    def __init__(self, cfg: ExperimentConfig, experiment_id: str, partition_id: int):
        if not re.fullmatch(r"[0-9A-Za-z_-]+", experiment_id):
            raise ValueError(f"experiment id {experiment_id!r} is not a plain name")
        self.folder = Path(cfg.data.root).expanduser() / STORE_DIR / experiment_id
        self.prefix = f"partition{partition_id}-round"

    def path(self, round_: int) -> Path:
        return self.folder / f"{self.prefix}{round_}.pt"

    def rounds(self) -> list[int]:
        """The rounds this client has a saved model of, oldest first."""
        found = (p.stem.removeprefix(self.prefix) for p in self.folder.glob(f"{self.prefix}*.pt"))
        return sorted(int(r) for r in found if r.isdigit())

    def save(self, round_: int, state: dict[str, torch.Tensor]) -> None:
        """Write atomically, then drop all but this client's `KEPT_ROUNDS` latest rounds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(round_).with_suffix(f".{os.getpid()}.tmp")
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
        os.replace(tmp, self.path(round_))
        for old in self.rounds()[:-KEPT_ROUNDS]:
            self.path(old).unlink(missing_ok=True)

    def newest(self, up_to: int) -> int | None:
        """The last round, `up_to` or before, this client saved a model of (a client not
        sampled in every round saved its model when it last trained)."""
        return max((r for r in self.rounds() if r <= up_to), default=None)

    def latest(self, up_to: int) -> dict[str, torch.Tensor] | None:
        """The model of `newest(up_to)`, if there is one."""
        round_ = self.newest(up_to)
        if round_ is None:
            return None
        return torch.load(self.path(round_), map_location="cpu", weights_only=True)


def trained_partitions(rows: list[dict[str, Any]]) -> set[int]:
    """The partitions that trained in a run's recorded rounds (results.json's rows): the
    clients that hold a personal model a resume must find."""
    return {p for row in rows for p in row.get("participants", [])}


def missing_models(cfg: ExperimentConfig, experiment_id: str, trained: set[int],
                   round_: int) -> list[int]:
    """The partitions in `trained` with no model saved here in `round_` or before: where
    every node shares this machine's disk (simulation), whether a resume would find them."""
    return sorted(p for p in trained
                  if PersonalModelStore(cfg, experiment_id, p).newest(round_) is None)
