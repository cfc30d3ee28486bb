import copy

import pytest
import torch
from flwr.app import ArrayRecord

from fedhpro_flwr.algorithms.models import build_model, place
from fedhpro_flwr.config import ConfigError, ModelConfig
from fedhpro_flwr.data.federated import DataSpec
from fedhpro_flwr.methods import parse_experiment

SEVEN = tuple("abcdefg")


@pytest.mark.parametrize(
    ("cfg", "spec", "dim"),
    [
        (ModelConfig(name="cnn", feature_dim=64), DataSpec((1, 28, 28), SEVEN), 64),
        (ModelConfig(name="resnet10", width=32), DataSpec((3, 32, 32), SEVEN), 256),
        (ModelConfig(name="resnet10", width=8), DataSpec((1, 28, 28), SEVEN), 64),
        (ModelConfig(name="text", feature_dim=16), DataSpec((12,), SEVEN, vocab_size=50), 16),
    ],
)
def test_backbones_expose_features_and_linear_classifier(cfg, spec, dim):
    model = build_model(cfg, spec)
    if spec.is_text:
        x = torch.randint(0, spec.vocab_size, (2, *spec.input_shape))
    else:
        x = torch.randn(2, *spec.input_shape)
    z = model.features(x)
    assert z.shape == (2, dim) and model.feature_dim == dim
    assert isinstance(model.classifier, torch.nn.Linear)
    assert torch.allclose(model(x), model.classifier(z))


def test_text_features_ignore_padding():
    model = build_model(ModelConfig(name="text", feature_dim=8), DataSpec((6,), SEVEN,
                                                                          vocab_size=20))
    short = torch.tensor([[3, 5, 0, 0, 0, 0]])
    longer_padding = torch.tensor([[3, 5, 0, 0, 0, 0, 0, 0, 0]])
    assert torch.allclose(model.features(short), model.features(longer_padding))
    assert not torch.allclose(model.features(short), model.features(torch.tensor([[3, 0]])))


@pytest.mark.parametrize(("name", "spec"), [("text", DataSpec((1, 8, 8), SEVEN)),
                                            ("cnn", DataSpec((12,), SEVEN, vocab_size=50))])
def test_a_model_that_does_not_fit_the_data_is_a_config_error(name, spec):
    with pytest.raises(ConfigError, match="does not fit the dataset"):
        build_model(ModelConfig(name=name), spec)


def test_kaiming_init_keeps_the_small_cnns_features_at_the_inputs_scale():
    """PyTorch's default init shrinks the signal layer by layer (the glyph sets' plateau at
    chance); He's init keeps the features' second moment near the input's; the classifier is
    PyTorch's in both, drawn from the same seed."""
    spec = DataSpec((3, 32, 32), tuple(map(str, range(100))))
    x = torch.randn(256, *spec.input_shape)
    scale, heads = {}, {}
    for init in ("pytorch", "kaiming"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="cnn", init=init), spec)
        with torch.no_grad():
            scale[init] = model.features(x).pow(2).mean().item()
        heads[init] = model.classifier.weight
    assert scale["pytorch"] < 0.01 and 1 < scale["kaiming"] < 20
    assert torch.equal(heads["pytorch"], heads["kaiming"])


def test_an_unknown_init_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.init"):
        parse_experiment({"model": {"init": "xavier"}})


@pytest.mark.parametrize("name", ["cnn", "resnet10"])
def test_a_model_placed_on_the_cpu_computes_the_same_in_channels_last(name):
    """`place` changes the convolutions' memory layout only: the same outputs and gradients
    up to float rounding, and a state dict that loads into a contiguous model unchanged."""
    spec = DataSpec((3, 32, 32), SEVEN)
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name=name, width=8), spec)
    placed = place(copy.deepcopy(plain), torch.device("cpu"))
    convs = [m.weight for m in placed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for model in (plain, placed):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert torch.allclose(plain(x), placed(x), atol=1e-5)
    for (key, a), b in zip(plain.named_parameters(), placed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), key
    reloaded = build_model(ModelConfig(name=name, width=8), spec)
    reloaded.load_state_dict(ArrayRecord(placed.state_dict()).to_torch_state_dict())
    for a, b in zip(reloaded.state_dict().values(), placed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_resnet_too_narrow_for_channels_last_keeps_its_layout_and_trains():
    """At width 4, ResNet-10's first strided shortcut sees 4 channels, whose channels-last
    backward aborts the process on AVX2-only CPUs (`models.channels_last_breaks`): placed, it
    keeps the default layout, and a backward pass through it completes."""
    spec = DataSpec((1, 28, 28), SEVEN)
    model = place(build_model(ModelConfig(name="resnet10", width=4), spec), torch.device("cpu"))
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                   for w in convs)
    x = torch.randn(16, 1, 28, 28, requires_grad=True)
    torch.nn.functional.cross_entropy(model(x), torch.zeros(16, dtype=torch.long)).backward()
    assert torch.isfinite(x.grad).all()
