"""MOON's model-contrastive learning (Li, He and Song, CVPR 2021): the projection head its
model puts between the feature extractor and the classifier, and the loss that pulls a
client's projections towards the global model's and away from its own previous model's."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedhpro_flwr.algorithms.models import Backbone


class ProjectedBackbone(Backbone):
    """A backbone whose features pass through MOON's projection head, ``Linear(d, d), ReLU,
    Linear(d, out_dim)``, with the classifier on the projection (its code's `ModelFedCon`).

    `features(x)` is the projection, so the training loops, evaluation and prototype code see
    this as any backbone of dimension `out_dim`. The backbone's own classifier is dropped; its
    extractor keeps the weights it was built with, and the head starts at PyTorch's
    initialisation (as in MOON's code).
    """

    def __init__(self, backbone: Backbone, out_dim: int):
        super().__init__()
        num_classes = backbone.classifier.out_features
        del backbone.classifier  # replaced by the one on the projection
        self.backbone = backbone
        d = backbone.feature_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, out_dim))
        self.feature_dim = out_dim
        self.classifier = nn.Linear(out_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.features(x))


def frozen_copy(model: Backbone, state: Mapping[str, torch.Tensor] | None = None) -> Backbone:
    """A copy of `model` (with `state` loaded, if given) that only computes: evaluation mode
    and no gradients, as MOON's code holds the global and previous models. A copy keeps the
    model's device and memory layout, so the same weights give the same projections."""
    frozen = copy.deepcopy(model)
    if state is not None:
        frozen.load_state_dict(state)
    return frozen.eval().requires_grad_(False)


def model_contrastive_loss(z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """MOON's l_con, averaged over the batch: per sample
    ``-log(exp(cos(z, z_glob) / t) / (exp(cos(z, z_glob) / t) + exp(cos(z, z_prev) / t)))``,
    i.e. cross-entropy with the global model's projection as the positive (class 0) and the
    previous model's as the negative."""
    logits = torch.stack([F.cosine_similarity(z, z_global, dim=-1),
                          F.cosine_similarity(z, z_previous, dim=-1)], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))
