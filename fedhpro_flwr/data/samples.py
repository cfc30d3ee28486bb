"""What every dataset source returns: its samples, split, with the label space and statistics.

Kept apart from `sources` so that source modules (e.g. `hf`) and `sources` itself both build
on it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedhpro_flwr.config import ConfigError


class DataMissing(ConfigError):
    """The dataset's files are not where the config says, and downloading is off."""


@dataclass(frozen=True)
class Samples:
    """Inputs, labels (N,) int64 and, for multi-domain data, the domain id of each sample
    (N,) int64. Inputs are uint8 images (N, C, H, W) or int64 token ids (N, max_tokens)."""

    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray | None = None


@dataclass(frozen=True)
class Splits:
    train: Samples
    test: Samples | None  # None: no official test split
    num_classes: int
    mean: tuple[float, ...] | None = None  # per-channel statistics used to standardise;
    std: tuple[float, ...] | None = None  # None: measured on the training images
    domains: tuple[str, ...] = ()  # names of the domain ids, for multi-domain data
    classes: tuple[str, ...] = ()  # class names in label order; () = "0", "1", ...

    @property
    def is_text(self) -> bool:
        return self.train.x.ndim == 2

    def class_names(self) -> tuple[str, ...]:
        return self.classes or tuple(str(c) for c in range(self.num_classes))

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is not None and self.std is not None:
            return np.asarray(self.mean), np.asarray(self.std)
        scaled = self.train.x.astype(np.float64) / 255.0
        return scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3)) + 1e-8
