import pytest
import torch
import torch.nn.functional as F
from by_autograd import with_autograd

from fedhpro_flwr.algorithms.gradmatch import (
    class_gradients,
    cosine_rows,
    descend,
    distance_and_grad,
    masked_class_mean,
    prepared_target,
    vector_distance,
)


def autograd_class_gradients(features, mask, weight, bias):
    """Reference: per-sample autograd gradients, averaged per class by a loop."""
    feature, weight_g, bias_g = [], [], []
    for c in range(features.shape[0]):
        z = features[c][mask[c]].clone().requires_grad_(True)
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        loss = F.cross_entropy(z @ w.T + b, torch.full((len(z),), c), reduction="sum")
        gz, gw, gb = torch.autograd.grad(loss, (z, w, b))
        n = len(z)
        feature.append(gz.sum(0) / n)
        weight_g.append(gw / n)
        bias_g.append(gb / n)
    return torch.stack(feature), torch.stack(weight_g), torch.stack(bias_g)


def test_closed_form_gradients_match_autograd():
    torch.manual_seed(0)
    features = torch.randn(4, 6, 5, dtype=torch.double)
    mask = torch.rand(4, 6) < 0.7
    mask[:, 0] = True
    weight, bias = torch.randn(4, 5, dtype=torch.double), torch.randn(4, dtype=torch.double)
    got = class_gradients(features, weight, bias, mask)
    want = autograd_class_gradients(features, mask, weight, bias)
    for a, b in zip((got.feature, got.weight, got.bias), want, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_rows_without_samples_are_zero():
    features = torch.randn(3, 4, 2)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    got = class_gradients(features, torch.randn(3, 2), torch.randn(3), mask)
    assert torch.equal(got.feature[1], torch.zeros(2))
    assert torch.equal(got.weight[1], torch.zeros(3, 2))


def test_masked_mean_ignores_clients_without_the_class():
    values = torch.tensor([[[1.0], [10.0]], [[3.0], [float("nan")]], [[5.0], [float("inf")]]])
    present = torch.tensor([[True, True], [True, False], [True, False]])
    mean, holders = masked_class_mean(values, present)
    assert mean.flatten().tolist() == [3.0, 10.0]
    assert holders.tolist() == [3, 1]


def test_vector_distances():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    b = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
    assert vector_distance(a, b, "cosine").item() == pytest.approx(0.0 + 1.0)
    assert vector_distance(a, b, "mse").item() == pytest.approx(1.0 + 1.0 + 4.0)
    with pytest.raises(ValueError, match="unknown distance"):
        vector_distance(a, b, "l1")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_closed_form_distance_gradient_matches_autograd(kind):
    torch.manual_seed(1)
    a = torch.randn(3, 4, 6, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, 4, 6, dtype=torch.double)
    present = torch.tensor([True, False, True])
    loss, grad = distance_and_grad(a.detach(), prepared_target(b, present, kind), present, kind)
    if kind == "cosine":
        assert cosine_rows(b, present) == 2 * 4
        loss = loss + cosine_rows(b, present)
    want = vector_distance(a[present], b[present], kind).sum()
    (want_grad,) = torch.autograd.grad(want, a)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(grad, want_grad, atol=1e-12)
    assert torch.equal(grad[1], torch.zeros(4, 6, dtype=torch.double))  # absent: no gradient
    with pytest.raises(ValueError, match="no closed-form gradient"):
        prepared_target(b, present, "l1")  # type: ignore[arg-type]


def test_descend_finds_a_quadratic_minimum_and_leaves_its_start_alone():
    start = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    result, before, after = descend(start, with_autograd(lambda x: (x - target).square().sum()),
                                    steps=50, lr=0.25)
    assert torch.allclose(result, target, atol=1e-6)
    assert before == pytest.approx(4 + 4 + 0.25 + 4) and after < 1e-10
    assert torch.equal(start, torch.tensor([[3.0, -1.0], [0.5, 2.0]]))
