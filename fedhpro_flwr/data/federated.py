"""Datasets and the per-client / held-out views of them that an experiment uses."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from fedhpro_flwr.config import ConfigError, DataConfig, ExperimentConfig
from fedhpro_flwr.data.imagefiles import cached_decode, class_folders, labelled_files
from fedhpro_flwr.data.npzcache import cached_arrays
from fedhpro_flwr.data.partition import (
    dirichlet_partition,
    domain_partition,
    iid_partition,
    k_classes_partition,
    long_tail_subset,
    stratified_split,
)
from fedhpro_flwr.data.sources import Samples, load_source, to_tensor
from fedhpro_flwr.data.text import encode, read_label_text_csv


@dataclass(frozen=True)
class TensorData:
    """Inputs (images (N, C, H, W) float32 or token ids (N, L) int64), labels (N,) int64,
    the label space size and, for multi-domain data, each sample's domain id (N,) and the
    domains' names."""

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


@dataclass(frozen=True)
class DataSpec:
    """What a node must know of the federation's data to train on its own: the input shape,
    the class names (labels are their positions), the standardisation statistics and, for
    text, the number of token ids. The server sends it with every round, so a SuperNode with
    its own `data-dir` never needs the federation's dataset."""

    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    mean: tuple[float, ...] = ()  # per channel; () for text
    std: tuple[float, ...] = ()
    vocab_size: int = 0  # token ids for text; 0 for images

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_text(self) -> bool:
        return self.vocab_size > 0

    def to_config(self) -> dict[str, Any]:
        """Flat ``{"data-spec.field": value}`` for a Flower ConfigRecord."""
        return {f"{SPEC_PREFIX}{k}": list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DataSpec:
        values = {k[len(SPEC_PREFIX):]: v for k, v in config.items()
                  if k.startswith(SPEC_PREFIX)}
        try:
            return cls(tuple(int(n) for n in values["input_shape"]),
                       tuple(str(c) for c in values["classes"]),
                       tuple(float(m) for m in values.get("mean", ())),
                       tuple(float(s) for s in values.get("std", ())),
                       int(values.get("vocab_size", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the server's message lacks a valid data spec ({exc!r})") \
                from None


SPEC_PREFIX = "data-spec."


@lru_cache(maxsize=4)
def load_dataset(data: DataConfig) -> tuple[TensorData, TensorData | None, DataSpec]:
    """(training pool, official test set or None, spec), standardised; cached per process."""
    splits = load_source(data)
    if splits.is_text:
        mean = std = np.zeros(0)
        spec = DataSpec((data.max_tokens,), splits.class_names(), vocab_size=data.text_buckets)
    else:
        mean, std = splits.statistics()
        spec = DataSpec(tuple(splits.train.x.shape[1:]), splits.class_names(),
                        tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def tensors(samples: Samples) -> TensorData:
        domain = None if samples.domain is None else torch.from_numpy(samples.domain)
        return TensorData(to_tensor(samples, mean, std), torch.from_numpy(samples.y),
                          splits.num_classes, domain, splits.domains)

    return tensors(splits.train), None if splits.test is None else tensors(splits.test), spec


def _dataset(cfg: ExperimentConfig) -> tuple[TensorData, TensorData | None]:
    return load_dataset(cfg.data)[:2]


# offsets the validation draw's seed from the test hold-out's (same seed, other samples)
VALIDATION_STREAM = 7919


class Split(NamedTuple):
    """Indices into the training pool: the held-out test share (None when the dataset has a
    test split), the validation share (None without one) and each client's."""

    test: np.ndarray | None
    validation: np.ndarray | None
    clients: list[np.ndarray]


@lru_cache(maxsize=8)
def _split(cfg: ExperimentConfig) -> Split:
    """How the experiment splits its data: a pure function of the config."""
    data, official_test = _dataset(cfg)
    domains = None if data.domain is None else data.domain.numpy()
    # every (domain, class) is held out in the same proportion
    strata = data.y.numpy() + (0 if domains is None else domains * data.num_classes)
    if official_test is None:
        train_idx, test_idx = stratified_split(strata, cfg.data.test_fraction, cfg.seed)
    else:
        train_idx, test_idx = np.arange(len(data)), None
    val_idx = None
    if cfg.data.validation_fraction:  # before the long tail: as balanced as the test set
        keep, held = stratified_split(strata[train_idx], cfg.data.validation_fraction,
                                      cfg.seed + VALIDATION_STREAM)
        train_idx, val_idx = train_idx[keep], train_idx[held]
    p = cfg.partition
    if p.scheme == "long-tail":  # the training set becomes long-tailed; the test set does not
        train_idx = train_idx[long_tail_subset(data.y.numpy()[train_idx], p.imbalance_factor,
                                               cfg.seed)]
    if p.scheme == "domains" and domains is None:
        raise ConfigError(f"partition.scheme 'domains' needs a multi-domain dataset; "
                          f"'{cfg.data.dataset}' has one domain")
    try:
        parts = _partition(cfg, data.y.numpy()[train_idx],
                           None if domains is None else domains[train_idx])
    except ValueError as exc:  # the partitioners' own messages say what cannot be done
        raise ConfigError(f"partition.scheme '{p.scheme}' on '{cfg.data.dataset}': {exc}") \
            from None
    return Split(test_idx, val_idx, [train_idx[part] for part in parts])


def _partition(cfg: ExperimentConfig, labels: np.ndarray,
               domains: np.ndarray | None) -> list[np.ndarray]:
    p = cfg.partition
    if p.scheme == "iid":
        return iid_partition(len(labels), p.num_partitions, cfg.seed)
    if p.scheme == "k-classes":
        return k_classes_partition(labels, p.num_partitions, p.classes_per_client, cfg.seed)
    if p.scheme == "domains":
        assert domains is not None
        return domain_partition(labels, domains, p.num_partitions, p.alpha, cfg.seed,
                                p.min_size, p.domain_fraction, p.domain_clients(),
                                p.client_fraction)
    return dirichlet_partition(labels, p.num_partitions, p.alpha, cfg.seed, p.min_size)


def held_out_data(cfg: ExperimentConfig) -> TensorData:
    """What the server evaluates the global model on: the official test set, else the
    stratified hold-out."""
    data, official_test = _dataset(cfg)
    if official_test is not None:
        return official_test
    test_idx = _split(cfg).test
    assert test_idx is not None
    return data.subset(test_idx)


def validation_data(cfg: ExperimentConfig) -> TensorData | None:
    """The validation share of the training pool (`data.validation_fraction`), or None."""
    val_idx = _split(cfg).validation
    return None if val_idx is None else _dataset(cfg)[0].subset(val_idx)


class HeldOut(NamedTuple):
    """What the server evaluates on: the test data, and the validation share if any."""

    test: TensorData
    validation: TensorData | None


def held_out(cfg: ExperimentConfig) -> HeldOut:
    return HeldOut(held_out_data(cfg), validation_data(cfg))


def client_data(cfg: ExperimentConfig, partition_id: int) -> TensorData:
    """One client's training data."""
    parts = _split(cfg).clients
    if not 0 <= partition_id < len(parts):
        raise ValueError(
            f"partition-id {partition_id} is out of range: the experiment has "
            f"partition.num_partitions = {len(parts)}"
        )
    return _dataset(cfg)[0].subset(parts[partition_id])


# bump when what `client_data` returns for the same config changes, so old caches are not read
PARTITION_CACHE_VERSION = 1


def partition_cache_path(cfg: ExperimentConfig, partition_id: int) -> Path:
    """Where `cached_client_data` keeps a partition: under `data.root`, named by a hash of
    everything that determines it (the data and partition sections, the seed, the id)."""
    key = repr((PARTITION_CACHE_VERSION, cfg.data, cfg.partition, cfg.seed, partition_id))
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cfg.data.root).expanduser() / "partitions" / f"{digest}.npz"


def cached_client_data(cfg: ExperimentConfig, partition_id: int) -> TensorData:
    """`client_data`, kept on local disk after the first call.

    In deployment every round starts a fresh ClientApp process, which would otherwise load
    (or generate) the whole dataset, standardise it and split it again for one partition.
    The cache is keyed by the config only: replace a dataset's files under the same name and
    the old partitions stay; delete `<data.root>/partitions` then.
    """
    path = partition_cache_path(cfg, partition_id)

    def build() -> dict[str, np.ndarray]:
        data = client_data(cfg, partition_id)
        arrays = {"x": data.x.numpy(), "y": data.y.numpy(),
                  "num_classes": np.array(data.num_classes), "domains": np.array(data.domains)}
        if data.domain is not None:
            arrays["domain"] = data.domain.numpy()
        return arrays

    try:
        arrays = cached_arrays(path, build)
    except OSError as exc:  # a read-only or full disk: work without the cache
        logging.getLogger(__name__).warning(
            "partition cache %s unusable (%s); loading the dataset", path, exc)
        return client_data(cfg, partition_id)
    domain = arrays.get("domain")
    return TensorData(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]),
                      int(arrays["num_classes"]),
                      None if domain is None else torch.from_numpy(domain),
                      tuple(str(d) for d in arrays["domains"]))


def dataset_spec(cfg: ExperimentConfig) -> DataSpec:
    """The input shape, classes and statistics of the experiment's dataset."""
    return load_dataset(cfg.data)[2]


def local_data(spec: DataSpec, data: DataConfig, path: Path) -> TensorData:
    """A SuperNode's own data, used whole: an image folder (`path/<class name>/...`, class
    names as the federation's dataset names them) or, for text, a CSV in AG News' layout.
    Images are resized to the federation's input shape and standardised with its statistics,
    so the node feeds the global model what every other node feeds it."""
    if not path.exists():
        raise ConfigError(f"node config 'data-dir' = '{path}': no such file or folder")
    if spec.is_text:
        if not path.is_file():
            raise ConfigError(f"node config 'data-dir' = '{path}': the federation trains on "
                              "text, so data-dir must be a CSV file (class number from 1, text)")
        try:
            texts, y = read_label_text_csv(path, first_label=1)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"node config 'data-dir': {exc}") from None
        samples = Samples(encode(texts, spec.vocab_size, spec.input_shape[0]), y)
    else:
        if not path.is_dir():
            raise ConfigError(f"node config 'data-dir' = '{path}': the federation trains on "
                              "images, so data-dir must be a folder with one folder per class")
        unknown = [d.name for d in class_folders(path) if d.name not in spec.classes]
        if unknown:
            raise ConfigError(f"node config 'data-dir' = '{path}': folder '{unknown[0]}' is not "
                              f"a class of the federation's dataset ({', '.join(spec.classes)})")
        files, labels = labelled_files(path, spec.classes)
        channels, size = spec.input_shape[0], spec.input_shape[1]
        samples = Samples(cached_decode(files, size, channels, path / ".fedhpro-cache", "local"),
                          labels)
    if len(samples.y) == 0:
        raise ConfigError(f"node config 'data-dir' = '{path}': no samples found")
    bad = samples.y[(samples.y < 0) | (samples.y >= spec.num_classes)]
    if len(bad):
        raise ConfigError(f"node config 'data-dir' = '{path}': class number {bad[0] + 1} is "
                          f"outside 1..{spec.num_classes}")
    x = to_tensor(samples, np.asarray(spec.mean), np.asarray(spec.std))
    return TensorData(x, torch.from_numpy(samples.y), spec.num_classes)
