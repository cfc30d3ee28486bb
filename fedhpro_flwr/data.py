"""Datasets and the per-client / held-out views of them that an experiment uses."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, ExperimentConfig
from .partition import (
    dirichlet_partition,
    domain_partition,
    iid_partition,
    k_classes_partition,
    long_tail_subset,
    stratified_split,
)
from .sources import Images, load_source, to_tensor


@dataclass(frozen=True)
class TensorData:
    """Images (N, C, H, W) float32, labels (N,) int64, the label space size and, for
    multi-domain data, each image's domain id (N,) and the domains' names."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    domain: torch.Tensor | None = None
    domains: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> TensorData:
        idx = torch.as_tensor(index, dtype=torch.long)
        domain = None if self.domain is None else self.domain[idx]
        return TensorData(self.x[idx], self.y[idx], self.num_classes, domain, self.domains)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.y, minlength=self.num_classes)

    def domain_counts(self) -> torch.Tensor:
        """(D,) samples per domain; empty for single-domain data."""
        if self.domain is None:
            return torch.zeros(0, dtype=torch.long)
        return torch.bincount(self.domain, minlength=len(self.domains))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]


@lru_cache(maxsize=4)
def load_dataset(name: str, root: str, download: bool) -> tuple[TensorData, TensorData | None]:
    """(training pool, official test set or None), standardised; cached per process."""
    splits = load_source(name, Path(root), download)
    mean, std = splits.statistics()

    def tensors(images: Images) -> TensorData:
        domain = None if images.domain is None else torch.from_numpy(images.domain)
        return TensorData(to_tensor(images, mean, std), torch.from_numpy(images.y),
                          splits.num_classes, domain, splits.domains)

    return tensors(splits.train), None if splits.test is None else tensors(splits.test)


def _dataset(cfg: ExperimentConfig) -> tuple[TensorData, TensorData | None]:
    return load_dataset(cfg.data.dataset, cfg.data.root, cfg.data.download)


@lru_cache(maxsize=8)
def _split(cfg: ExperimentConfig) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """(held-out indices or None when the dataset has a test split, per-client train
    indices), a pure function of the config."""
    data, official_test = _dataset(cfg)
    domains = None if data.domain is None else data.domain.numpy()
    if official_test is None:  # hold out every (domain, class) in the same proportion
        strata = data.y.numpy() + (0 if domains is None else domains * data.num_classes)
        train_idx, test_idx = stratified_split(strata, cfg.data.test_fraction, cfg.seed)
    else:
        train_idx, test_idx = np.arange(len(data)), None
    p = cfg.partition
    if p.scheme == "long-tail":  # the training set becomes long-tailed; the test set does not
        train_idx = train_idx[long_tail_subset(data.y.numpy()[train_idx], p.imbalance_factor,
                                               cfg.seed)]
    labels = data.y.numpy()[train_idx]
    if p.scheme == "iid":
        parts = iid_partition(len(train_idx), p.num_partitions, cfg.seed)
    elif p.scheme == "k-classes":
        parts = k_classes_partition(labels, p.num_partitions, p.classes_per_client, cfg.seed)
    elif p.scheme == "domains":
        if domains is None:
            raise ConfigError(f"partition.scheme 'domains' needs a multi-domain dataset; "
                              f"'{cfg.data.dataset}' has one domain")
        parts = domain_partition(labels, domains[train_idx], p.num_partitions, p.alpha,
                                 cfg.seed, p.min_size, p.domain_fraction)
    else:
        parts = dirichlet_partition(labels, p.num_partitions, p.alpha, cfg.seed, p.min_size)
    return test_idx, [train_idx[part] for part in parts]


def held_out_data(cfg: ExperimentConfig) -> TensorData:
    """What the server evaluates the global model on: the official test set, else the
    stratified hold-out."""
    data, official_test = _dataset(cfg)
    if official_test is not None:
        return official_test
    test_idx = _split(cfg)[0]
    assert test_idx is not None
    return data.subset(test_idx)


def client_data(cfg: ExperimentConfig, partition_id: int) -> TensorData:
    """One client's training data."""
    parts = _split(cfg)[1]
    if not 0 <= partition_id < len(parts):
        raise ValueError(
            f"partition-id {partition_id} is out of range: the experiment has "
            f"partition.num_partitions = {len(parts)}"
        )
    return _dataset(cfg)[0].subset(parts[partition_id])


def dataset_info(cfg: ExperimentConfig) -> TensorData:
    """The training pool, for its input shape and number of classes."""
    return _dataset(cfg)[0]
