import pytest
import torch
import torch.nn.functional as F

from fedhpro_flwr.algorithms.gradmatch import class_gradients, vector_distance, with_autograd
from fedhpro_flwr.algorithms.hyperproto import (
    anchors,
    centers,
    centred_directions,
    init_hyperprototypes,
    match_hyperprototypes,
    matching_loss,
    matching_objective,
    nearest_classes,
    neighbour_agreement,
    row_matching_objective,
    separated,
)


def matched(hp, weight, bias, target, present, steps, lr, distance="cosine", step="sgd"):
    """The paper's matching: feature gradients at the (held fixed) classifier."""
    objective = matching_objective(weight, bias, target, present, distance)
    return match_hyperprototypes(hp, objective, steps, lr, step)


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


def test_orthogonal_init_makes_class_means_orthogonal_and_keeps_the_spread():
    g = torch.Generator().manual_seed(4)
    normal = init_hyperprototypes(10, 5, 32, torch.Generator().manual_seed(4))
    hp = init_hyperprototypes(10, 5, 32, g, "orthogonal")
    unit = centers(hp)
    assert torch.allclose(unit @ unit.T, torch.eye(10), atol=1e-5)
    assert (centers(normal) @ centers(normal).T - torch.eye(10)).abs().max() > 0.1
    # each class's draws are shifted together: differences within a class are unchanged
    assert torch.allclose(hp - hp[:, :1], normal - normal[:, :1], atol=1e-5)
    assert torch.allclose(hp.mean(dim=1).norm(dim=1), normal.mean(dim=1).norm(dim=1), atol=1e-5)
    with pytest.raises(ValueError, match="classes <= feature dim"):
        init_hyperprototypes(40, 5, 32, g, "orthogonal")


def test_normalized_steps_move_each_class_by_lr_times_its_norm():
    hp, weight, bias, target = setup(5)
    present = torch.tensor([True, True, False, True, True])
    one = matched(hp, weight, bias, target, present, 1, 0.01, step="normalized")
    moved = (one.hyperprototypes - hp).flatten(1).norm(dim=1)
    assert torch.allclose(moved[present], 0.01 * hp[present].flatten(1).norm(dim=1), rtol=1e-4)
    assert moved[~present].item() == 0.0
    plain = matched(hp, weight, bias, target, present, 30, 0.1)
    far = matched(hp, weight, bias, target, present, 30, 0.01, step="normalized")
    assert far.loss_after < plain.loss_after and far.movement > plain.movement


def test_the_reference_codes_per_scalar_distance_never_moves_the_hyperprototypes():
    hp, weight, bias, target = setup(6)
    present = torch.ones(5, dtype=torch.bool)
    result = matched(hp, weight, bias, target, present, 30, 0.1, "scalar")
    assert torch.equal(result.hyperprototypes, hp)  # a sign agreement has no gradient
    assert result.loss_before == result.loss_after > 0


def random_problem(seed, num_classes, per_class, dim):
    """Hyper-prototypes, a classifier and a target, all standard normal, in double."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_classes, per_class, dim, generator=g, dtype=torch.double),
            torch.randn(num_classes, dim, generator=g, dtype=torch.double),
            torch.randn(num_classes, generator=g, dtype=torch.double),
            torch.randn(num_classes, dim, generator=g, dtype=torch.double))


@pytest.mark.parametrize("distance", ["cosine", "mse", "scalar"])
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


def test_own_row_gradients_are_the_diagonal_of_the_classifier_gradients():
    hp, weight, bias, _ = setup(7)
    grads = class_gradients(hp, weight, bias)
    assert torch.allclose(grads.own_row, torch.diagonal(grads.weight).T, atol=1e-6)
    # mean_l (p_c(P[c, l]) - 1) P[c, l]: minus the class's vectors, weighted by what is owed
    probs = torch.softmax(hp @ weight.T + bias, dim=-1)
    owed = 1.0 - torch.diagonal(probs, dim1=0, dim2=2).T
    assert torch.allclose(grads.own_row, -(owed[..., None] * hp).mean(dim=1), atol=1e-6)
    assert torch.equal(class_gradients(hp, weight, bias, with_classifier=False).own_row,
                       grads.own_row)


def test_centred_directions_ignore_length_and_absent_rows():
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(4, 6, generator=g)
    present = torch.tensor([True, True, False, True])
    centred = centred_directions(rows, present)
    scaled = centred_directions(rows * torch.tensor([[3.0], [0.5], [7.0], [2.0]]), present)
    assert torch.allclose(centred, scaled, atol=1e-6)
    assert torch.equal(centred[2], torch.zeros(6))
    assert torch.allclose(centred[present].sum(dim=0), torch.zeros(6), atol=1e-6)
    unit = F.normalize(rows[present], dim=1)
    assert torch.allclose(centred[present], unit - unit.mean(dim=0), atol=1e-6)


def test_row_matching_moves_the_anchors_towards_where_the_classes_lie():
    """Features of class c cluster around a class mean sharing one positive component with
    every other class (as after a ReLU); the own-row targets measured on them pull the
    anchors' centred directions to the centred class means, which the paper's target does
    not (its gradients are about -W_c whatever the features)."""
    g = torch.Generator().manual_seed(9)
    num_classes, dim = 5, 16
    hp = init_hyperprototypes(num_classes, 3, dim, g)
    weight, bias = torch.randn(num_classes, dim, generator=g) * 0.1, torch.zeros(num_classes)
    means = torch.rand(num_classes, dim, generator=g) + 2.0
    real = means[:, None, :] + 0.3 * torch.randn(num_classes, 20, dim, generator=g)
    present = torch.tensor([True, True, True, False, True])
    target = torch.diagonal(class_gradients(real, weight, bias).weight).T
    target[~present] = float("nan")  # absent rows must not leak in

    def agreement(p):
        a = centred_directions(anchors(p), present)
        return F.cosine_similarity(a, centred_directions(means, present), dim=1)[present].mean()

    result = match_hyperprototypes(hp, row_matching_objective(weight, bias, target, present),
                                   30, 0.05, "normalized")
    assert result.loss_after < result.loss_before
    assert agreement(hp) < 0.3 and agreement(result.hyperprototypes) > 0.8
    assert torch.equal(result.hyperprototypes[~present], hp[~present])
    paper_target = class_gradients(real, weight, bias, with_classifier=False).feature
    paper = matched(hp, weight, bias, paper_target, present, 30, 0.05, step="normalized")
    assert agreement(paper.hyperprototypes) < 0.5


def test_separated_means_are_orthogonal_and_move_least():
    g = torch.Generator().manual_seed(9)
    shared = torch.randn(8, generator=g)
    hp = shared + 0.5 * torch.randn(5, 3, 8, generator=g)  # class means close to each other
    present = torch.tensor([True, True, False, True, True])
    moved = separated(hp, present)
    means, new_means = hp.mean(dim=1), moved.mean(dim=1)
    unit = F.normalize(new_means[present], dim=1)
    assert torch.allclose(unit @ unit.T, torch.eye(4), atol=1e-5)
    assert torch.allclose(new_means.norm(dim=1), means.norm(dim=1), atol=1e-5)
    assert torch.allclose(moved - new_means[:, None], hp - means[:, None], atol=1e-5)
    assert torch.equal(moved[2], hp[2])  # an absent class stays
    # nearer the learned directions than Gram-Schmidt's orthonormal set
    before = F.normalize(means[present], dim=1)
    basis, _ = torch.linalg.qr(before.T)
    gram_schmidt = basis.T * torch.sign((basis.T * before).sum(dim=1, keepdim=True))
    assert (unit - before).norm() < (gram_schmidt - before).norm()
    # already orthogonal: nothing moves
    assert torch.allclose(separated(moved, present), moved, atol=1e-5)
    with pytest.raises(ValueError, match="classes <= feature dim"):
        separated(torch.randn(9, 2, 8), torch.ones(9, dtype=torch.bool))
