"""Backbones: a feature extractor ``features(x) -> z in R^d`` and a linear ``classifier``."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from fedhpro_flwr.config import ConfigError, ModelConfig
from fedhpro_flwr.data.federated import DataSpec


class Backbone(nn.Module):
    """``forward(x) = classifier(features(x))``; prototype methods use both halves."""

    feature_dim: int
    classifier: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(Backbone):
    """Three 3x3 conv blocks of width, 2x and 4x width filters and a ReLU projection to d
    (~100k parameters at 28x28, width 16, d=128): small enough for CPU federations."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, feature_dim: int,
                 width: int = 16):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = (in_channels, width, 2 * width, 4 * width)
        for c_in, c_out in pairwise(channels):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.extractor = nn.Sequential(
            *blocks, nn.Flatten(),
            nn.Linear(4 * width * (image_size // 8) ** 2, feature_dim), nn.ReLU(),
        )
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(),
            nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet10(Backbone):
    """CIFAR-style ResNet with BasicBlock [1, 1, 1, 1]; d = 8 * width (256 for width 32), or
    `feature_dim` through a ReLU projection (clients of different widths sharing one d)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32,
                 feature_dim: int | None = None):
        super().__init__()
        planes = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        ]
        in_planes = width
        for i, p in enumerate(planes):
            layers.append(BasicBlock(in_planes, p, stride=1 if i == 0 else 2))
            in_planes = p
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.feature_dim = planes[-1]
        if feature_dim is not None and feature_dim != planes[-1]:
            layers += [nn.Linear(planes[-1], feature_dim), nn.ReLU()]
            self.feature_dim = feature_dim
        self.extractor = nn.Sequential(*layers)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)


class TextBackbone(Backbone):
    """fastText-style: the mean of the token embeddings (padding left out), projected to d with
    a ReLU. Token ids come hashed (text.py), so the embedding table has `vocab_size` rows."""

    def __init__(self, vocab_size: int, num_classes: int, feature_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, feature_dim, padding_idx=0)
        self.project = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU())
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        present = (x != 0).unsqueeze(-1).float()
        summed = (self.embedding(x) * present).sum(dim=1)
        return self.project(summed / present.sum(dim=1).clamp(min=1.0))


def kaiming_init(model: Backbone) -> Backbone:
    """He et al.'s normal initialisation (fan-in, ReLU gain) of the extractor's convolutions
    and linear layers, biases zero; the classifier keeps PyTorch's. PyTorch's default scales
    each layer's output variance by about 1/6 behind a ReLU, so the small CNN's logits start
    near zero and, at 100 classes, FedAvg sits at chance on glyphs100-lt for 8 rounds and more;
    with this it leaves chance by round 3."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear) and module is not model.classifier:
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def build_model(cfg: ModelConfig, spec: DataSpec,
                backbone: tuple[str, int] | None = None) -> Backbone:
    """The backbone the config names, for the data the spec describes; `backbone` (name,
    width), one of `model.backbones`, builds that one instead, with d = model.feature_dim."""
    model = _backbone(cfg, spec, backbone)
    return kaiming_init(model) if cfg.init == "kaiming" else model


def _backbone(cfg: ModelConfig, spec: DataSpec, backbone: tuple[str, int] | None) -> Backbone:
    if backbone is not None:
        channels, height, _ = spec.input_shape
        name, width = backbone
        if name == "cnn":
            return SmallCNN(channels, height, spec.num_classes, cfg.feature_dim, width)
        return ResNet10(channels, spec.num_classes, width, cfg.feature_dim)
    if (cfg.name == "text") != spec.is_text:
        kind = "text" if spec.is_text else "images"
        raise ConfigError(f"config key 'model.name' = '{cfg.name}' does not fit the dataset, "
                          f"which holds {kind}: use " + ("'text'" if spec.is_text else
                                                         "'cnn' or 'resnet10'"))
    if cfg.name == "text":
        return TextBackbone(spec.vocab_size, spec.num_classes, cfg.feature_dim)
    channels, height, _ = spec.input_shape
    if cfg.name == "cnn":
        return SmallCNN(channels, height, spec.num_classes, cfg.feature_dim)
    return ResNet10(channels, spec.num_classes, cfg.width)


def place(model: Backbone, device: torch.device) -> Backbone:
    """`model` moved to `device`; on a CPU with its convolution weights stored channels-last,
    which takes PyTorch's faster CPU convolutions whatever the inputs' layout (local training
    1.7-2.4x faster for the small CNN, 1.2x for ResNet-10, as measured). Only the
    memory layout changes: values, state dicts and uploads are the same up to float rounding.
    GPUs keep the default layout (not measured there), and so does a model with a layer that
    channels-last breaks (`channels_last_breaks`)."""
    if device.type == "cpu" and not any(channels_last_breaks(m) for m in model.modules()):
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def channels_last_breaks(module: nn.Module) -> bool:
    """A strided 1x1 convolution over fewer than 8 channels (ResNet-10's first shortcut at width
    4): oneDNN's channels-last backward of it corrupts the heap on AVX2-only CPUs (torch
    2.14.1: "double free or corruption", the process aborts; fine with oneDNN off, or at 8
    channels)."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
            and module.stride != (1, 1) and module.in_channels < 8)
