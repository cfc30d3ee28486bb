import pytest
import torch

from fedhpro_flwr.config import ModelConfig
from fedhpro_flwr.models import build_model


@pytest.mark.parametrize(
    ("cfg", "shape", "dim"),
    [
        (ModelConfig(name="cnn", feature_dim=64), (1, 28, 28), 64),
        (ModelConfig(name="resnet10", width=32), (3, 32, 32), 256),
        (ModelConfig(name="resnet10", width=8), (1, 28, 28), 64),
    ],
)
def test_backbones_expose_features_and_linear_classifier(cfg, shape, dim):
    model = build_model(cfg, shape, num_classes=7)
    x = torch.randn(2, *shape)
    z = model.features(x)
    assert z.shape == (2, dim) and model.feature_dim == dim
    assert isinstance(model.classifier, torch.nn.Linear)
    assert torch.allclose(model(x), model.classifier(z))
