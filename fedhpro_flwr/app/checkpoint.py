"""Checkpoints: everything a new ServerApp needs to continue a run where it stopped."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedhpro_flwr.config import ExperimentConfig

FORMAT_VERSION = 3
# version 1 also held Python's `random` state (Flower sampled nodes with it); nothing reads it
# now that the round's sample comes from the seed, and it is dropped on load. Versions 1 and 2
# held a hash of the whole config, which any method's changed default broke: the config the
# results record decides now
READABLE_VERSIONS = (1, 2, 3)
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or from another run setup."""


@dataclass
class Checkpoint:
    """The state at the end of `round`."""

    strategy: str
    round: int
    weights: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]
    torch_rng: torch.Tensor
    results: dict[str, Any]  # results.json's content, its "config" and "num_classes" too

    @staticmethod
    def capture(strategy: str, round_: int, weights: dict[str, torch.Tensor],
                strategy_state: dict[str, Any], results: dict[str, Any]) -> Checkpoint:
        return Checkpoint(strategy, round_, weights, strategy_state, torch.get_rng_state(),
                          results)

    def restore_rng(self) -> None:
        torch.set_rng_state(self.torch_rng)


def save_checkpoint(checkpoint: Checkpoint, out_dir: Path) -> Path:
    """Write atomically (temp file + rename): a crash mid-write leaves the old one intact."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT_NAME
    tmp = path.with_suffix(".tmp")
    torch.save({"format_version": FORMAT_VERSION, **vars(checkpoint)}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(out_dir: Path, strategy: str, experiment: ExperimentConfig) -> Checkpoint:
    """Read and check a checkpoint against the run that wants to continue it: the same
    strategy, and an experiment that differs only in what the run does not depend on
    (`ExperimentConfig.setup_changes`: its rounds, where it computes, other methods' keys).
    Runs with personal models continue only from checkpoints whose clients saved theirs
    (`personal_store`)."""
    path = out_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"resume requested but there is no checkpoint at {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        version = raw.pop("format_version")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {path} has format {version}, expected one of "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    raw.pop("python_rng", None)
    raw.pop("fingerprint", None)
    try:
        checkpoint = Checkpoint(**raw)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if experiment.model.backbone_list() and "experiment_id" not in checkpoint.results:
        # measured: such a run resumed at round 31 restored none of its 10 clients' models
        # and fell from 0.88 to 0.42 (the protocol benchmark's hetero table, 2026-12)
        raise CheckpointError(
            f"checkpoint {path} is from a run with heterogeneous backbones (model.backbones) "
            "made before its clients saved their personal models for a resume; a continued "
            "run would restart them: run it afresh")
    if checkpoint.strategy != strategy:
        raise CheckpointError(f"checkpoint {path} is from strategy '{checkpoint.strategy}', "
                              f"this run is '{strategy}'")
    recorded = checkpoint.results.get("config")
    if not isinstance(recorded, dict):
        raise CheckpointError(f"checkpoint {path} holds no record of its experiment config")
    changes = experiment.setup_changes(recorded, strategy, checkpoint.results.get("num_classes"))
    if changes:
        listed = ", ".join(f"{key} {then!r} -> {now!r}" for key, (then, now) in changes.items())
        raise CheckpointError(
            f"checkpoint {path} was written with another experiment config ({listed}); only "
            f"federation.rounds, where the run computes and other methods' keys may change on "
            "resume")
    return checkpoint
