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


def long_tail_subset(labels: np.ndarray, imbalance_factor: float, seed: int) -> np.ndarray:
    """Indices of an exponentially long-tailed subset (CReFF's and FedHPro's CIFAR-LT rule).

    Class c (in sorted order) keeps ``int(n_max * imbalance_factor ** (-c / (C - 1)))``
    samples, drawn at random, n_max being the largest class count: the first class keeps
    all of it and the last ``n_max / imbalance_factor``. A class with fewer samples keeps all.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    n_max = counts.max()
    steps = max(len(classes) - 1, 1)
    keep = []
    for rank, c in enumerate(classes):
        n = int(n_max * imbalance_factor ** (-rank / steps))
        keep.append(rng.permutation(np.flatnonzero(labels == c))[:n])
    return np.sort(np.concatenate(keep))


def k_classes_partition(
    labels: np.ndarray, num_partitions: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
    """Pathological label skew: every client holds exactly `classes_per_client` classes.

    Classes are dealt out round-robin in a seeded random order, so every class has a holder;
    each class's samples are split evenly among its holders. Disjoint and complete.
    """
    classes = np.unique(labels)
    if classes_per_client > len(classes):
        raise ValueError(f"classes_per_client={classes_per_client} exceeds the "
                         f"{len(classes)} classes of the data")
    if num_partitions * classes_per_client < len(classes):
        raise ValueError(
            f"{num_partitions} clients with {classes_per_client} classes each cannot hold all "
            f"{len(classes)} classes; raise partition.classes_per_client"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    held = [[order[(i * classes_per_client + j) % len(classes)]
             for j in range(classes_per_client)] for i in range(num_partitions)]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for c in classes:
        holders = [i for i, mine in enumerate(held) if c in mine]
        idx = rng.permutation(np.flatnonzero(labels == c))
        for holder, chunk in zip(holders, np.array_split(idx, len(holders)), strict=True):
            parts[holder].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def domain_partition(
    labels: np.ndarray,
    domains: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    fraction: float = 1.0,
    clients_per_domain: tuple[int, ...] = (),
    client_fraction: float = 0.0,
) -> list[np.ndarray]:
    """Domain shift plus label skew: each client holds data of one domain only.

    Clients are dealt to domains round-robin (client i gets domain i mod D), or in blocks of
    `clients_per_domain` (FPL's setups give the domains unequal numbers of clients). A random
    `fraction` of each domain is used, or, when `client_fraction` is set, that share of the
    domain per client (FPL's `percent`), and split over that domain's clients by Dirichlet
    label skew (a large alpha gives FPL's setting: an even share of the domain per client).
    Disjoint; complete when fraction is 1 and client_fraction is 0.
    """
    domain_ids = np.unique(domains)
    if clients_per_domain:
        if len(clients_per_domain) != len(domain_ids) or sum(clients_per_domain) != num_partitions:
            raise ValueError(f"clients_per_domain {list(clients_per_domain)} must give each of "
                             f"the {len(domain_ids)} domains a number of clients, adding up to "
                             f"{num_partitions}")
        owner = np.repeat(np.arange(len(domain_ids)), clients_per_domain)
    elif num_partitions < len(domain_ids):
        raise ValueError(f"{num_partitions} clients cannot cover {len(domain_ids)} domains: "
                         "give every domain at least one client")
    else:
        owner = np.arange(num_partitions) % len(domain_ids)
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * num_partitions
    for d, domain in enumerate(domain_ids):
        clients = np.flatnonzero(owner == d)
        share = client_fraction * len(clients) if client_fraction else fraction
        if share > 1:
            raise ValueError(f"domain {domain}: {len(clients)} clients holding "
                             f"{client_fraction} of it each need more than the whole domain")
        idx = rng.permutation(np.flatnonzero(domains == domain))
        idx = np.sort(idx[: max(round(len(idx) * share), 1)])
        split = dirichlet_partition(labels[idx], len(clients), alpha, seed + d, min_size)
        for client, part in zip(clients, split, strict=True):
            parts[client] = idx[part]
    return parts
