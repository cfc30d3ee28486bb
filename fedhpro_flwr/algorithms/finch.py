"""FINCH clustering (Sarfraz et al., CVPR 2019), as FPL uses it on client prototypes.

Each point links to its first (nearest) neighbour; the connected components of those links
are the clusters. Repeating this on the cluster means gives ever coarser partitions, until
one cluster remains or nothing merges. No parameters, no number of clusters to choose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def first_neighbours(points: torch.Tensor) -> torch.Tensor:
    """(N,) index of each point's nearest other point by cosine distance."""
    unit = F.normalize(points, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(float("-inf"))
    return similarity.argmax(dim=1)


def linked_components(neighbours: torch.Tensor) -> torch.Tensor:
    """Cluster labels 0..K-1 of the graph with edges i - neighbours[i].

    This is FINCH's clustering equation: i and j join when one is the other's first
    neighbour or they share one. Labels are numbered by each cluster's first point.
    """
    labels = torch.arange(len(neighbours))
    while True:
        pulled = torch.minimum(labels, labels[neighbours])  # from the neighbour
        pushed = pulled.scatter_reduce(0, neighbours, pulled, reduce="amin")  # to it
        if torch.equal(pushed, labels):
            break
        labels = pushed
    return torch.unique(labels, return_inverse=True)[1]


def cluster_means(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(K, d) mean of the points in each cluster."""
    num = int(labels.max()) + 1
    sums = torch.zeros(num, points.shape[1], dtype=points.dtype).index_add_(0, labels, points)
    return sums / torch.bincount(labels, minlength=num)[:, None].to(points.dtype)


def finch(points: torch.Tensor) -> list[torch.Tensor]:
    """FINCH's partitions of `points` (N, d), finest first, each an (N,) label tensor.

    The last one is the coarsest with more than one cluster (or the first partition, if that
    already has one cluster), as FINCH returns them.
    """
    if len(points) < 2:
        return [torch.zeros(len(points), dtype=torch.long)]
    labels = linked_components(first_neighbours(points))
    partitions = [labels]
    while int(labels.max()) > 0:
        means = cluster_means(points, labels)
        merged = linked_components(first_neighbours(means))[labels]
        clusters, before = int(merged.max()) + 1, int(labels.max()) + 1
        if clusters == 1 or clusters >= before:
            break
        partitions.append(merged)
        labels = merged
    return partitions
