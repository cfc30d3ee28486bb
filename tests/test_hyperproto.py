import pytest
import torch
import torch.nn.functional as F
from by_autograd import with_autograd

from fedhpro_flwr.algorithms.gradmatch import class_gradients, vector_distance
from fedhpro_flwr.algorithms.hyperproto import (
    anchors,
    centers,
    init_hyperprototypes,
    match_hyperprototypes,
    matching_loss,
    matching_objective,
    nearest_classes,
    neighbour_agreement,
)


def matched(hp, weight, bias, target, present, steps, lr, distance="cosine"):
    """The paper's matching: feature gradients at the (held fixed) classifier."""
    objective = matching_objective(weight, bias, target, present, distance)
    return match_hyperprototypes(hp, objective, steps, lr)


def setup(seed=0, num_classes=5, dim=16):
    g = torch.Generator().manual_seed(seed)
    hp = init_hyperprototypes(num_classes, 3, dim, g)
    weight, bias = torch.randn(num_classes, dim, generator=g), torch.randn(num_classes, generator=g)
    # targets: gradients of real-looking features (other random vectors)
    real = torch.randn(num_classes, 20, dim, generator=g).relu()
    target = class_gradients(real, weight, bias, with_classifier=False).feature
    return hp, weight, bias, target


def mean_cosine(hp, weight, bias, target, present):
    grads = class_gradients(hp, weight, bias, with_classifier=False).feature
    return F.cosine_similarity(grads[present], target[present], dim=1).mean().item()


def test_init_is_seeded_standard_normal():
    a = init_hyperprototypes(10, 5, 64, torch.Generator().manual_seed(3))
    b = init_hyperprototypes(10, 5, 64, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (10, 5, 64)
    assert abs(a.mean().item()) < 0.05 and abs(a.std().item() - 1) < 0.05


def test_views_for_the_client_losses():
    hp = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]])
    assert torch.allclose(anchors(hp), torch.tensor([[0.5, 0.5]]))  # mean of unit vectors
    assert torch.allclose(centers(hp), F.normalize(torch.tensor([[1.0, 2.0]]), dim=1))


def test_matching_lowers_loss_and_raises_cosine():
    hp, weight, bias, target = setup()
    present = torch.ones(5, dtype=torch.bool)
    before = mean_cosine(hp, weight, bias, target, present)
    result = matched(hp, weight, bias, target, present, steps=200, lr=1.0)
    after = mean_cosine(result.hyperprototypes, weight, bias, target, present)
    assert result.loss_after < result.loss_before
    assert after > before + 0.05
    assert result.movement > 0


def test_absent_classes_do_not_move_and_zero_steps_change_nothing():
    hp, weight, bias, target = setup(1)
    present = torch.tensor([True, False, True, True, False])
    target[~present] = float("nan")  # whatever sits in absent rows must not leak in
    result = matched(hp, weight, bias, target, present, steps=20, lr=1.0)
    assert torch.equal(result.hyperprototypes[~present], hp[~present])
    assert not torch.equal(result.hyperprototypes[present], hp[present])
    assert torch.isfinite(result.hyperprototypes).all()
    unchanged = matched(hp, weight, bias, target, present, steps=0, lr=1.0)
    assert torch.equal(unchanged.hyperprototypes, hp) and unchanged.movement == 0.0


def test_mse_distance_also_descends():
    hp, weight, bias, target = setup(2)
    present = torch.ones(5, dtype=torch.bool)
    result = matched(hp, weight, bias, target, present, 50, 0.5, "mse")
    assert result.loss_after < result.loss_before


def random_problem(seed, num_classes, per_class, dim):
    """Hyper-prototypes, a classifier and a target, all standard normal, in double."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_classes, per_class, dim, generator=g, dtype=torch.double),
            torch.randn(num_classes, dim, generator=g, dtype=torch.double),
            torch.randn(num_classes, generator=g, dtype=torch.double),
            torch.randn(num_classes, dim, generator=g, dtype=torch.double))


@pytest.mark.parametrize("distance", ["cosine", "mse"])
def test_closed_form_matching_gradient_equals_autograd(distance):
    hp, weight, bias, target = random_problem(3, 5, 4, 7)
    present = torch.tensor([True, False, True, True, True])
    loss, grad = matching_objective(weight, bias, target, present, distance)(hp)
    want_loss, want_grad = with_autograd(
        lambda p: matching_loss(p, weight, bias, target, present, distance))(hp)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
    assert torch.allclose(grad, want_grad, atol=1e-12)
    assert torch.equal(grad[1], torch.zeros(4, 7, dtype=torch.double))


@pytest.mark.parametrize("distance", ["cosine", "mse"])
def test_matching_over_nearest_classes(distance):
    hp, weight, bias, target = random_problem(4, 12, 3, 6)
    present = torch.ones(12, dtype=torch.bool)
    present[5] = False
    # every class as a neighbour, in another order: the full softmax's loss and gradient
    everyone = nearest_classes(hp, weight, bias, 12)
    assert torch.equal(everyone[:, 0], torch.arange(12))
    assert torch.equal(everyone.sort(dim=1).values, torch.arange(12).expand(12, 12))
    full = matching_objective(weight, bias, target, present, distance)(hp)
    reordered = matching_objective(weight, bias, target, present, distance, everyone)(hp)
    assert reordered[0].item() == pytest.approx(full[0].item(), rel=1e-12)
    assert torch.allclose(reordered[1], full[1], atol=1e-12)
    # four neighbours: the gradient of the loss whose softmax sees only those classes
    near = nearest_classes(hp, weight, bias, 4)
    logits = hp.mean(dim=1) @ weight.T + bias
    assert torch.equal(logits.gather(1, near[:, 1:]),
                       logits.masked_fill(torch.eye(12, dtype=torch.bool), -torch.inf)
                       .topk(3, dim=1).values)

    def truncated(p):
        mask = torch.full((12, 12), -torch.inf, dtype=p.dtype).scatter_(1, near, 0.0)
        probs = torch.softmax(p @ weight.T + bias + mask[:, None, :], dim=-1)
        grads = (probs - torch.eye(12, dtype=p.dtype)[:, None, :]).mean(dim=1) @ weight
        return vector_distance(grads[present], target[present], distance).sum()

    loss, grad = matching_objective(weight, bias, target, present, distance, near)(hp)
    want_loss, want_grad = with_autograd(truncated)(hp)
    # how far the restricted softmax's gradient is from the full one's
    mask = torch.full((12, 12), -torch.inf, dtype=hp.dtype).scatter_(1, near, 0.0)
    eye = torch.eye(12, dtype=hp.dtype)[:, None, :]
    restricted = (torch.softmax(hp @ weight.T + bias + mask[:, None, :], -1) - eye).mean(1)
    full_grad = class_gradients(hp, weight, bias, with_classifier=False).feature
    assert neighbour_agreement(hp, weight, bias, near) == pytest.approx(
        F.cosine_similarity(restricted @ weight, full_grad, dim=1).mean().item(), rel=1e-9)
    assert neighbour_agreement(hp, weight, bias, everyone) == pytest.approx(1.0, rel=1e-9)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
    assert torch.allclose(grad, want_grad, atol=1e-12)
