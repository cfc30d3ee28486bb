"""Checkpoints: everything a new ServerApp needs to continue a run where it stopped."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 2
# version 1 also held Python's `random` state (Flower sampled nodes with it); nothing reads it
# now that the round's sample comes from the seed, and it is dropped on load
READABLE_VERSIONS = (1, 2)
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or from another run setup."""


@dataclass
class Checkpoint:
    """The state at the end of `round`."""

    strategy: str
    fingerprint: str  # ExperimentConfig.fingerprint(): the run setup it belongs to
    round: int
    weights: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]
    torch_rng: torch.Tensor
    results: dict[str, Any]

    @staticmethod
    def capture(strategy: str, fingerprint: str, round_: int, weights: dict[str, torch.Tensor],
                strategy_state: dict[str, Any], results: dict[str, Any]) -> Checkpoint:
        return Checkpoint(strategy, fingerprint, round_, weights, strategy_state,
                          torch.get_rng_state(), results)

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


def load_checkpoint(out_dir: Path, strategy: str, fingerprint: str) -> Checkpoint:
    """Read and check a checkpoint against the run that wants to continue it."""
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
    if version == 1:
        raw.pop("python_rng", None)
    try:
        checkpoint = Checkpoint(**raw)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if checkpoint.strategy != strategy:
        raise CheckpointError(f"checkpoint {path} is from strategy '{checkpoint.strategy}', "
                              f"this run is '{strategy}'")
    if checkpoint.fingerprint != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was written with another experiment config (fingerprint "
            f"{checkpoint.fingerprint}, this run {fingerprint}); only federation.rounds may "
            "change on resume"
        )
    return checkpoint
