import math

import pytest
import torch
import torch.nn.functional as F

from fedhpro_flwr.algorithms.extraction import ClassStatistics
from fedhpro_flwr.algorithms.gradmatch import class_gradients, vector_distance
from fedhpro_flwr.algorithms.recalibration import (
    FederatedFeatures,
    RecalibrationSettings,
    classifier_on,
    feature_matching,
    fresh_linear,
    pooled_moments,
    recalibrate,
    train_linear,
    train_linear_class_groups,
    train_linear_full_batch,
)


def toy_problem(seed=0, num_classes=4, dim=8):
    """Separable Gaussian classes and a classifier trained on a long-tailed sample of them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 2.0

    def sample(n_per_class):
        xs = [centres[c] + torch.randn(n, dim, generator=g) for c, n in enumerate(n_per_class)]
        ys = [torch.full((n,), c) for c, n in enumerate(n_per_class)]
        return torch.cat(xs), torch.cat(ys)

    x_tail, y_tail = sample([400, 40, 8, 2])
    biased_w, biased_b = train_linear(x_tail, y_tail, num_classes, 20, 0.05, 50, g)
    real = torch.stack([sample([100] * num_classes)[0].view(num_classes, 100, dim)[c]
                        for c in range(num_classes)])
    x_test, y_test = sample([200] * num_classes)
    return real, biased_w, biased_b, x_test, y_test, g


def accuracy(weight, bias, x, y):
    return ((x @ weight.T + bias).argmax(1) == y).float().mean().item()


def test_recalibration_improves_a_biased_classifier():
    real, weight, bias, x_test, y_test, g = toy_problem()
    target = class_gradients(real, weight, bias)  # what clients would upload
    present = torch.ones(4, dtype=torch.bool)
    features = torch.randn(4, 20, 8, generator=g)
    result = recalibrate(features, weight, bias, target, present, match_steps=200,
                         feature_lr=0.1, epochs=100, lr=0.01, batch_size=20, generator=g)
    before = accuracy(weight, bias, x_test, y_test)
    after = accuracy(result.weight, result.bias, x_test, y_test)
    assert result.match_loss_after < result.match_loss_before
    assert after > before + 0.05, (before, after)


def test_absent_classes_keep_their_features():
    real, weight, bias, *_rest, g = toy_problem(1)
    target = class_gradients(real, weight, bias)
    present = torch.tensor([True, True, False, True])
    features = torch.randn(4, 10, 8, generator=g)
    result = recalibrate(features, weight, bias, target, present, match_steps=10,
                         feature_lr=0.1, epochs=2, lr=0.01, batch_size=10, generator=g)
    assert torch.equal(result.features[2], features[2])
    assert not torch.equal(result.features[0], features[0])


def client_statistics(real, weight, bias, classes):
    """What a client holding `classes` uploads (zero rows and no count for the others)."""
    grads = class_gradients(real, weight, bias)
    present = torch.zeros(real.shape[0], dtype=torch.bool)
    present[list(classes)] = True
    keep = present.float()
    return ClassStatistics(present, present.long() * 10, grads.feature * keep[:, None],
                           grads.weight * keep[:, None, None], grads.bias * keep[:, None])


def test_federated_features_average_over_holders_and_remember_seen_classes():
    real, weight, bias, *_test, g = toy_problem(2)
    settings = RecalibrationSettings(match_steps=200, feature_lr=0.1, epochs=100, lr=0.01,
                                     batch_size=20)
    federated = FederatedFeatures(4, 20, 8, g)
    untouched = federated.features[3].clone()
    first = federated.recalibrate(weight, bias, [client_statistics(real, weight, bias, [0, 1]),
                                                 client_statistics(real, weight, bias, [1, 2])],
                                  settings, g)
    assert federated.seen.tolist() == [True, True, True, False]
    assert torch.equal(federated.features[3], untouched)  # nobody holds class 3 yet
    assert torch.equal(federated.features, first.features)
    assert first.match_loss_after < first.match_loss_before
    federated.recalibrate(weight, bias, [client_statistics(real, weight, bias, [3])], settings, g)
    assert federated.seen.all()  # classes seen in earlier rounds still train the classifier
    assert not torch.equal(federated.features[3], untouched)


@pytest.mark.parametrize("distance", ["cosine", "mse"])
def test_closed_form_matching_gradient_equals_autograd(distance):
    """Against the plain formulation: class_gradients + vector_distance, differentiated."""
    g = torch.Generator().manual_seed(5)
    features = torch.randn(4, 7, 6, generator=g, dtype=torch.double)
    weight = torch.randn(4, 6, generator=g, dtype=torch.double)
    bias = torch.randn(4, generator=g, dtype=torch.double)
    target = class_gradients(torch.randn(4, 9, 6, generator=g, dtype=torch.double), weight, bias)
    present = torch.tensor([True, False, True, True])
    loss, grad = feature_matching(features, weight, bias, target, present, distance)

    v = features.clone().requires_grad_(True)
    mine = class_gradients(v, weight, bias)
    want = (vector_distance(mine.weight[present], target.weight[present], distance)
            + vector_distance(mine.bias[present], target.bias[present], distance)).sum()
    (want_grad,) = torch.autograd.grad(want, v)
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    assert torch.allclose(grad, want_grad, atol=1e-10)
    assert torch.equal(grad[1], torch.zeros(7, 6, dtype=torch.double))  # absent: not moved


def test_train_linear_is_minibatch_sgd_on_cross_entropy():
    """Against nn.Linear + autograd + torch.optim.SGD on the same draws and shuffles."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(23, 5, generator=g, dtype=torch.double)
    y = torch.randint(0, 3, (23,), generator=g)
    weight, bias = train_linear(x, y, 3, 4, 0.3, 5, torch.Generator().manual_seed(2))

    ref_g = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(5, 3).double()
    with torch.no_grad():
        layer.weight.copy_(((torch.rand(3, 5, generator=ref_g) * 2 - 1) * 5**-0.5).double())
        layer.bias.copy_(((torch.rand(3, generator=ref_g) * 2 - 1) * 5**-0.5).double())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.3)
    for _ in range(4):
        order = torch.randperm(23, generator=ref_g)
        for start in range(0, 23, 5):
            batch = order[start : start + 5]
            optimizer.zero_grad()
            F.cross_entropy(layer(x[batch]), y[batch]).backward()
            optimizer.step()
    assert torch.allclose(weight, layer.weight.detach(), atol=1e-12)
    assert torch.allclose(bias, layer.bias.detach(), atol=1e-12)


def test_full_batch_solver_is_full_batch_gradient_descent_on_the_epoch_schedule():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(20, 5, generator=g, dtype=torch.double)
    y = torch.arange(20) % 4
    weight, bias = train_linear_full_batch(x, y, 4, 6, 0.05, 5, torch.Generator().manual_seed(3))

    ref_g = torch.Generator().manual_seed(3)
    w = ((torch.rand(4, 5, generator=ref_g) * 2 - 1) * 5**-0.5).double().requires_grad_(True)
    b = ((torch.rand(4, generator=ref_g) * 2 - 1) * 5**-0.5).double().requires_grad_(True)
    for _ in range(6):  # 4 minibatches of 5 per epoch: one step at 4 x 0.05
        gw, gb = torch.autograd.grad(F.cross_entropy(x @ w.T + b, y), (w, b))
        with torch.no_grad():
            w -= 0.2 * gw
            b -= 0.2 * gb
    assert torch.allclose(weight, w.detach(), atol=1e-12)
    assert torch.allclose(bias, b.detach(), atol=1e-12)


def test_full_batch_solver_recalibrates_like_minibatch_sgd():
    """Same problem, both solvers: the same accuracy gain and nearly the same classifier."""
    real, weight, bias, x_test, y_test, g = toy_problem()
    target = class_gradients(real, weight, bias)
    present = torch.ones(4, dtype=torch.bool)
    features = torch.randn(4, 20, 8, generator=g)
    results = {solver: recalibrate(features, weight, bias, target, present, match_steps=200,
                                   feature_lr=0.1, epochs=100, lr=0.01, batch_size=20,
                                   generator=torch.Generator().manual_seed(0), solver=solver)
               for solver in ("sgd", "full-batch")}
    sgd, full = results["sgd"], results["full-batch"]
    assert torch.equal(sgd.features, full.features)  # matching does not depend on the solver
    assert accuracy(full.weight, full.bias, x_test, y_test) == pytest.approx(
        accuracy(sgd.weight, sgd.bias, x_test, y_test), abs=0.01)
    assert (full.weight - sgd.weight).norm() < 0.05 * sgd.weight.norm()


def test_class_groups_step_on_each_group_with_the_sampled_softmax_correction():
    g = torch.Generator().manual_seed(5)
    features = torch.randn(7, 4, 3, generator=g, dtype=torch.double)
    classes = torch.tensor([True, True, False, True, True, True, True])
    weight, bias = train_linear_class_groups(features, classes, 2, 0.1, 3,
                                             torch.Generator().manual_seed(8), 4)

    ref_g = torch.Generator().manual_seed(8)
    w, b = (t.double() for t in fresh_linear(7, 3, ref_g))
    trained = torch.tensor([0, 1, 3, 4, 5, 6])
    for _ in range(2):  # 6 classes in a group of 4 and one of 2 per epoch
        order = trained[torch.randperm(6, generator=ref_g)]
        for group in (order[:4], order[4:]):
            size = len(group)
            x = features[group].flatten(0, 1)
            labels = torch.arange(size).repeat_interleave(4)
            gw = w[group].clone().requires_grad_(True)
            gb = b[group].clone().requires_grad_(True)
            # every other class's logit raised by log((C - 1) / (S - 1)), C = 6 classes
            raised = torch.log(torch.tensor(5 / (size - 1), dtype=torch.double)) * (
                1 - F.one_hot(labels, size))
            loss = F.cross_entropy(x @ gw.T + gb + raised, labels, reduction="sum")
            dw, db = torch.autograd.grad(loss, (gw, gb))
            step = 0.1 * math.ceil(4 * size / 3) / (4 * size)  # lr x batches' worth, per sample
            w[group], b[group] = gw.detach() - step * dw, gb.detach() - step * db
    assert torch.allclose(weight, w, atol=1e-12) and torch.allclose(bias, b, atol=1e-12)
    assert torch.equal(weight[2], fresh_linear(7, 3, torch.Generator().manual_seed(8))[0][2]
                       .double())  # an untrained class keeps its fresh row


def test_class_groups_train_the_classifier_full_batch_steps_train():
    g = torch.Generator().manual_seed(2)
    means = torch.randn(40, 16, generator=g).relu() * 1.5
    features = means[:, None] + torch.randn(40, 30, 16, generator=g)
    test = means[:, None] + torch.randn(40, 50, 16, generator=g)
    classes = torch.ones(40, dtype=torch.bool)

    def trained(per_step):
        return classifier_on(features, classes, "full-batch", 60, 0.05, 30,
                             torch.Generator().manual_seed(0), per_step)

    def accuracy_of(weight, bias):
        return ((test @ weight.T + bias).argmax(dim=-1) == torch.arange(40)[:, None]).float().mean()

    full, grouped = trained(0), trained(8)
    assert accuracy_of(*full) > 0.6  # a problem the classifier learns
    assert accuracy_of(*grouped) == pytest.approx(accuracy_of(*full).item(), abs=0.01)
    # the correction keeps the rows as far apart as the full softmax does (without: 23% shorter)
    assert grouped[0].norm() == pytest.approx(full[0].norm().item(), rel=0.1)
    # as many classes per step as there are classes: the full-batch solver itself
    assert all(torch.equal(a, b) for a, b in zip(trained(40), full, strict=True))


def moment_statistics(samples: dict[int, torch.Tensor], num_classes: int) -> ClassStatistics:
    """What a client holding `samples` (class -> (n, d) features) uploads with moments."""
    dim = next(iter(samples.values())).shape[1]
    present = torch.zeros(num_classes, dtype=torch.bool)
    counts = torch.zeros(num_classes, dtype=torch.long)
    means, variances = torch.zeros(num_classes, dim), torch.zeros(num_classes)
    for c, z in samples.items():
        present[c], counts[c] = True, len(z)
        means[c] = z.mean(dim=0)
        variances[c] = z.var(dim=0, correction=0).mean()
    zeros = torch.zeros(num_classes, dim)
    return ClassStatistics(present, counts, zeros, None, None, means, variances)


def test_pooled_moments_are_the_moments_of_all_clients_samples_together():
    g = torch.Generator().manual_seed(3)
    a = {0: torch.randn(7, 5, generator=g) + 2, 1: torch.randn(3, 5, generator=g)}
    b = {0: torch.randn(20, 5, generator=g) * 3, 2: torch.randn(4, 5, generator=g) - 1}
    means, variances, present = pooled_moments([moment_statistics(a, 4),
                                                moment_statistics(b, 4)])
    assert present.tolist() == [True, True, True, False]
    for c in range(3):
        union = torch.cat([s[c] for s in (a, b) if c in s])
        assert torch.allclose(means[c], union.mean(dim=0), atol=1e-5)
        assert variances[c].item() == pytest.approx(union.var(dim=0, correction=0).mean().item(),
                                                    rel=1e-5)
    assert variances[3] == 0 and (means[3] == 0).all()


def test_moment_features_are_drawn_around_the_pooled_means():
    g = torch.Generator().manual_seed(4)
    federated = FederatedFeatures(3, 2000, 6, g)
    untouched = federated.features[2].clone()
    centre = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    stats = moment_statistics({0: centre + 0.5 * torch.randn(500, 6, generator=g),
                               1: -centre + torch.zeros(40, 6)}, 3)
    settings = RecalibrationSettings(match_steps=0, feature_lr=0.1, epochs=5, lr=0.1,
                                     batch_size=200, source="moments")
    result = federated.recalibrate(torch.zeros(3, 6), torch.zeros(3), [stats], settings, g)
    assert result.diagnostics() == {}  # drawn, not matched
    assert torch.equal(federated.features[2], untouched)  # nobody holds class 2
    assert federated.seen.tolist() == [True, True, False]
    assert torch.equal(federated.features[1], (-centre).expand(2000, 6))  # no spread: the mean
    drawn = federated.features[0]
    assert torch.allclose(drawn.mean(dim=0), stats.feature_means[0], atol=0.05)  # 4.5 sd
    assert drawn.var(dim=0).mean().item() == pytest.approx(stats.feature_vars[0].item(), rel=0.1)
    # the new classifier tells the two classes apart, with no training sample of either
    z = torch.stack([centre, -centre])
    assert ((z @ result.weight.T + result.bias).argmax(dim=1) == torch.tensor([0, 1])).all()


def test_moment_recalibration_needs_moments():
    settings = RecalibrationSettings(match_steps=0, feature_lr=0.1, epochs=1, lr=0.1,
                                     batch_size=10, source="moments")
    bare = ClassStatistics(torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.long),
                           torch.zeros(2, 3), None, None)
    with pytest.raises(ValueError, match="moments"):
        FederatedFeatures(2, 4, 3, torch.Generator()).recalibrate(
            torch.zeros(2, 3), torch.zeros(2), [bare], settings, torch.Generator())
