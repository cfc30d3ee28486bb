import math

import pytest
import torch
import torch.nn.functional as F

from fedhpro_flwr.algorithms.losses import RunningClassMeans, client_margin, hpal, hpcl


def test_hpcl_matches_hand_computation():
    z = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # normalised: (0.6, 0.8), (0, 1)
    y = torch.tensor([0, 1])
    anchors = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    tau, margin = 0.5, 2.0
    # sample 0: s = (0.6, 0.4) / 0.5 = (1.2, 0.8); sample 1: s = (0, 0.5) / 0.5 = (0, 1)
    loss0 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(0.8) + margin))
    loss1 = -math.log(math.exp(1.0) / (math.exp(0.0) + math.exp(1.0) + margin))
    got = hpcl(F.normalize(z, dim=1), y, anchors, tau, margin)
    assert got.item() == pytest.approx((loss0 + loss1) / 2, rel=1e-6)


def test_hpcl_without_margin_is_cross_entropy_on_cosine_logits():
    torch.manual_seed(0)
    z, anchors = torch.randn(6, 4), torch.randn(3, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    zh = F.normalize(z, dim=1)
    expected = F.cross_entropy(zh @ anchors.T / 0.1, y)
    assert hpcl(zh, y, anchors, 0.1, 0.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_larger_margin_gives_larger_loss():
    torch.manual_seed(1)
    z, anchors = torch.randn(8, 5), F.normalize(torch.randn(4, 5), dim=1)
    y = torch.randint(0, 4, (8,))
    zh = F.normalize(z, dim=1)
    losses = [hpcl(zh, y, anchors, 0.5, m).item() for m in (0.0, 1.0, 100.0, 1e6)]
    assert losses == sorted(losses) and losses[-1] > losses[0] + 1.0


def test_a_margin_tensor_on_the_device_equals_the_same_float():
    torch.manual_seed(3)
    zh, anchors = F.normalize(torch.randn(8, 5), dim=1), torch.randn(4, 5)
    y = torch.randint(0, 4, (8,))
    for m in (0.0, 0.7, 30.0):
        as_tensor = hpcl(zh, y, anchors, 0.5, torch.tensor(m)).item()
        assert as_tensor == pytest.approx(hpcl(zh, y, anchors, 0.5, m).item(), rel=1e-6)
    zero = zh.clone().requires_grad_(True)  # log(0) = -inf must leave the gradient finite
    hpcl(zero, y, anchors, 0.5, torch.tensor(0.0)).backward()
    assert torch.isfinite(zero.grad).all()


def test_hpal_matches_smooth_l1_by_hand():
    z = torch.tensor([[3.0, 4.0]])
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # zh = (0.6, 0.8); target class 1 -> diffs (0.6, -0.2): 0.5*d^2 each (|d| < 1)
    expected = (0.5 * 0.36 + 0.5 * 0.04) / 2
    got = hpal(F.normalize(z, dim=1), torch.tensor([1]), centers).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_client_margin_equals_pairwise_sum_over_held_classes():
    torch.manual_seed(2)
    means = torch.rand(5, 3)
    present = torch.tensor([True, False, True, True, False])
    held = means[present]
    pairwise = sum(held[i] @ held[j] for i in range(3) for j in range(3) if i != j)
    assert client_margin(means, present).item() == pytest.approx(pairwise.item() / 16, rel=1e-5)


def test_client_margin_is_clamped_at_zero_and_grows_with_entanglement():
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert client_margin(opposite, torch.tensor([True, True])).item() == 0.0
    apart = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    entangled = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0]])
    both = torch.tensor([True, True, False])
    assert client_margin(entangled, both) > client_margin(apart, both)


def test_running_means_follow_batches_and_add_new_classes():
    running = RunningClassMeans(torch.zeros(3, 2), torch.tensor([True, False, False]), 0.5)
    running.update(torch.tensor([[2.0, 2.0], [4.0, 0.0], [6.0, 0.0]]), torch.tensor([0, 1, 1]))
    assert torch.allclose(running.means[0], torch.tensor([1.0, 1.0]))  # 0.5*0 + 0.5*2
    assert torch.allclose(running.means[1], torch.tensor([5.0, 0.0]))  # first sight: batch mean
    assert running.present.tolist() == [True, True, False]
    assert torch.equal(running.means[2], torch.zeros(2))
