"""Seeded splits of a labelled dataset: held-out test set and client partitions."""

from __future__ import annotations

import numpy as np


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with every class held out in the same proportion."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def iid_partition(num_samples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Equal-sized random shards."""
    rng = np.random.default_rng(seed)
    return [np.sort(p) for p in np.array_split(rng.permutation(num_samples), num_partitions)]


def dirichlet_partition(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label skew: each class is spread over clients by proportions drawn from Dir(alpha).

    Draws are repeated until every client holds at least `min_size` samples, the usual
    rule in the label-skew literature; the partition is disjoint and covers every sample.
    """
    if min_size * num_partitions > len(labels):
        raise ValueError(
            f"cannot give {num_partitions} partitions at least {min_size} samples each "
            f"from {len(labels)} samples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return merged
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw gave every one of {num_partitions} partitions "
        f"{min_size} samples in {max_tries} tries; lower partition.min_size or raise alpha"
    )
