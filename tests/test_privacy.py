"""Differential privacy: each released statistic bounded by its clip and noised at the scale
the accountant is told, DP-SGD's noise, the ledger against Opacus's own accountant, and
private replies of every method through the real client and strategy code."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from simulate import OVERRIDES, simulate
from test_method_round import CFG, NUM_CLIENTS, client_replies
from torch import nn

from fedhpro_flwr.algorithms.extraction import extract_class_statistics, private_class_statistics
from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.privacy import (
    RELEASES,
    SAMPLE_RATE,
    SGD_STEPS,
    ClientPrivacy,
    PrivacyLedger,
    clip_rows,
    noise_for_epsilon,
    run_epsilon,
    sgd_schedule,
)
from fedhpro_flwr.algorithms.training import train_batches
from fedhpro_flwr.app.sharing import sharing_for
from fedhpro_flwr.config import ConfigError, PrivacyConfig, TrainConfig
from fedhpro_flwr.data.federated import TensorData, dataset_spec
from fedhpro_flwr.methods import METHODS, get_method, parse_experiment
from fedhpro_flwr.methods.payload import PayloadError
from fedhpro_flwr.methods.strategy import check_privacy_report


def private(sigma: float = 1.0, clip: float = 1.0, seed: int = 0, **keys) -> ClientPrivacy:
    cfg = PrivacyConfig(noise_multiplier=sigma, stats_clip=clip, **keys)
    return ClientPrivacy(cfg, torch.Generator().manual_seed(seed))


def head_only(layer: nn.Module, dim: int) -> Backbone:
    """A backbone whose features are its inputs and whose classifier is `layer`."""

    class HeadOnly(Backbone):
        def __init__(self):
            super().__init__()
            self.feature_dim = dim
            self.extractor = nn.Identity()
            self.classifier = layer

        def features(self, x):
            return self.extractor(x)

    return HeadOnly()


def test_rows_are_clipped_to_the_bound_and_rows_within_it_kept():
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = clip_rows(rows, 1.0)
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))


def test_one_record_moves_each_released_class_sum_by_at_most_the_clip():
    """Without noise to hide it (a tiny multiplier), adding one huge record to class 1 moves
    class 1's sum by exactly the clip, in the same direction, and no other class at all."""
    z = torch.randn(40, 3)
    labels = torch.arange(40) % 4
    huge = torch.tensor([[1e6, 0.0, 0.0]])

    def sums(features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        accumulator = private(sigma=1e-9, clip=2.0).class_sums(4)
        accumulator.add([features], y)
        release = accumulator.release()
        return release.means[0].double() * release.counts[:, None]

    before, after = sums(z, labels), sums(torch.cat([z, huge]), torch.cat([labels,
                                                                           torch.tensor([1])]))
    moved = (after - before).norm(dim=1)
    assert moved[1] == pytest.approx(2.0, rel=1e-4)
    assert torch.allclose(moved[[0, 2, 3]], torch.zeros(3, dtype=torch.float64), atol=1e-3)


def test_the_statistics_noise_is_the_multiplier_times_the_records_bound():
    """Three parts of a record, each clipped to 0.5, move the joint sums by at most
    0.5 * sqrt(3): the release must add sigma times that to every coordinate, and sigma times 1
    (a count's sensitivity) to every count; the ledger charges it as two such releases."""
    sigma, bound = 2.0, 0.5
    privacy = private(sigma=sigma, clip=bound, seed=1)
    sums = privacy.class_sums(4000)  # many classes: many draws of one release
    z = torch.randn(30, 5)
    labels = torch.arange(30)
    sums.add([z, -z, z[:, :1]], labels)
    true_sums, true_counts = [s.clone() for s in sums.sums], sums.counts.clone()
    noisy_sums, noisy_counts = sums.noised()
    noise = torch.cat([(n - t).flatten() for n, t in zip(noisy_sums, true_sums, strict=True)])
    assert noise.std().item() == pytest.approx(sigma * bound * math.sqrt(3), rel=0.03)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.03)
    assert (noisy_counts - true_counts).std().item() == pytest.approx(sigma, rel=0.03)
    assert privacy.releases == 2


def test_a_class_the_client_lacks_is_reported_rarely_and_its_rows_are_zero():
    sums = private(sigma=1.0, seed=2).class_sums(20000)
    sums.add([torch.ones(3, 2)], torch.tensor([0, 0, 0]))
    release = sums.release()
    absent = release.present[1:]
    assert absent.double().mean().item() == pytest.approx(0.00135, abs=0.0008)  # 3 sigma
    assert release.counts[1:][~absent].eq(0).all()
    assert release.means[0][1:][~absent].eq(0).all()
    assert (release.counts[release.present] >= 1).all()


def test_dp_sgd_adds_noise_of_sigma_times_the_clip_over_the_batch():
    """A loss with no gradient: each DP-SGD step moves the weights by noise alone, of std
    lr * sigma * max_grad_norm / batch size per weight (Opacus's DPOptimizer)."""

    class Linear(Backbone):
        def __init__(self):
            super().__init__()
            self.feature_dim = 64
            self.extractor = nn.Linear(8, 64)
            self.classifier = nn.Linear(64, 32)

        def features(self, x):
            return self.extractor(x)

    model = Linear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorData(torch.randn(256, 8), torch.randint(0, 32, (256,)), num_classes=32)
    train = TrainConfig(local_epochs=1, batch_size=256, lr=1.0)  # one step, everyone
    privacy = private(sigma=3.0, max_grad_norm=0.5, seed=4)

    def no_gradient(x, y):
        loss = 0.0 * model(x).sum()
        return loss, loss

    train_batches(model, data, train, torch.Generator().manual_seed(0), torch.device("cpu"),
                  no_gradient, privacy=privacy)
    moved = torch.cat([(model.state_dict()[k] - before[k]).flatten() for k in before])
    assert moved.std().item() == pytest.approx(3.0 * 0.5 / 256, rel=0.05)
    assert (privacy.sgd_steps, privacy.sample_rate) == (1, 1.0)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None
                   for p in model.parameters())  # Opacus's hooks are gone


def test_dp_sgd_clips_each_records_gradient():
    """One record with a huge loss cannot move the model more than the clip allows."""
    model = nn.Linear(4, 2)

    backbone = head_only(model, 4)
    before = model.weight.detach().clone(), model.bias.detach().clone()
    x = torch.zeros(10, 4)
    x[0] = 1e4  # the outlier
    data = TensorData(x, torch.zeros(10, dtype=torch.long), num_classes=2)
    train = TrainConfig(local_epochs=1, batch_size=10, lr=1.0)
    privacy = private(sigma=1e-9, max_grad_norm=0.1, seed=5)

    def loss_of(x, y):
        loss = torch.nn.functional.cross_entropy(backbone(x), y)
        return loss, loss

    train_batches(backbone, data, train, torch.Generator().manual_seed(0), torch.device("cpu"),
                  loss_of, privacy=privacy)
    step = torch.cat([(model.weight - before[0]).flatten(), model.bias - before[1]]).norm()
    # the mean of per-record clipped gradients over the expected batch: at most the clip
    assert 0.0 < step.item() <= 0.1 + 1e-6


def gaussian_epsilon(sigma: float, releases: int, delta: float) -> float:
    """(epsilon, delta) of `releases` Gaussian mechanisms of multiplier sigma, by hand: Renyi
    DP alpha * releases / (2 sigma^2) at each order, converted as Opacus converts it (Balle
    et al. 2020) and minimised over Opacus's orders."""
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS)
    rdp = alphas * releases / (2 * sigma**2)
    eps = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    return float(np.nanmin(eps))


def test_the_ledger_charges_statistics_as_gaussian_releases_and_dp_sgd_as_opacus_does():
    cfg = PrivacyConfig(noise_multiplier=1.1, stats_noise_multiplier=4.0, delta=1e-5)
    ledger = PrivacyLedger(cfg)
    ledger.spend(7, {SGD_STEPS: 0.0, SAMPLE_RATE: 0.0, RELEASES: 2.0})
    ledger.spend(7, {SGD_STEPS: 0.0, SAMPLE_RATE: 0.0, RELEASES: 2.0})
    assert ledger.epsilon(7) == pytest.approx(gaussian_epsilon(4.0, 4, 1e-5), rel=1e-9)

    ledger.spend(3, {SGD_STEPS: 40.0, SAMPLE_RATE: 0.05, RELEASES: 0.0})
    watched = RDPAccountant()  # what Opacus counts when it watches the same 40 steps
    for _ in range(40):
        watched.step(noise_multiplier=1.1, sample_rate=0.05)
    assert ledger.epsilon(3) == pytest.approx(watched.get_epsilon(1e-5), rel=1e-9)
    assert ledger.worst() == max(ledger.epsilon(3), ledger.epsilon(7))

    saved = ledger.to_json()
    again = PrivacyLedger(cfg, saved)  # resume: the same histories, the same epsilons
    assert again.to_json() == saved
    assert PrivacyLedger(cfg).worst() == 0.0


def test_a_private_reply_must_report_the_sampling_the_config_gives_it():
    train = TrainConfig(local_epochs=2, batch_size=64)
    rate, steps = sgd_schedule(300, 64, 2)
    assert (rate, steps) == (64 / 300, 10)
    good = {SAMPLE_RATE: rate, SGD_STEPS: float(steps), RELEASES: 2.0}
    check_privacy_report(good, 300, train)
    for lie in ({SAMPLE_RATE: rate / 10}, {SGD_STEPS: 1.0}, {RELEASES: -2.0},
                {RELEASES: 0.5}):
        with pytest.raises(PayloadError):
            check_privacy_report(good | lie, 300, train)


def test_privacy_refuses_what_it_cannot_cover():
    with pytest.raises(ConfigError, match="BatchNorm"):
        parse_experiment({"privacy": {"noise_multiplier": 1.0}, "model": {"name": "resnet10"}})
    with pytest.raises(ConfigError, match="BatchNorm"):
        parse_experiment({"privacy": {"noise_multiplier": 1.0},
                          "model": {"backbones": "cnn-8,resnet10-4"}})
    with pytest.raises(ConfigError, match="consistency"):
        parse_experiment({"privacy": {"noise_multiplier": 1.0},
                          "diagnostics": {"consistency": True}})
    with pytest.raises(ConfigError, match="learn_scale"):
        get_method("fednh").make_strategy(parse_experiment(
            {"privacy": {"noise_multiplier": 1.0}}), {}, 2, 2)
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        parse_experiment({"privacy": {"delta": 0.5}})
    assert not parse_experiment({}).privacy.enabled  # off by default


# what a private reply may say beyond its weights and statistics: the protocol's bookkeeping,
# what it spent, and values computed from what it released (FedSA's gap, from its released
# prototypes of an earlier round; which round MOON's and FedSA's kept state is from)
ALLOWED = {"num-examples", "partition-id", "client-seconds", "client-started", SGD_STEPS,
           SAMPLE_RATE, RELEASES, "previous_round", "fedsa_previous_round", "fedsa_gap"}


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_methods_private_reply_says_nothing_outside_the_accounting(name):
    fixed = {"fednh": {"learn_scale": False}} if name == "fednh" else {}
    cfg = parse_experiment({**CFG.to_dict(), "privacy": {"noise_multiplier": 1.0}, **fixed})
    info = dataset_spec(cfg)
    torch.manual_seed(cfg.seed)
    model = sharing_for(cfg, get_method(name)).server_model(info)
    strategy = get_method(name).make_strategy(cfg, model.state_dict(), info.num_classes,
                                              model.feature_dim)
    replies = client_replies(name, strategy, model, cfg)
    for reply in replies:
        metrics = dict(reply.content.metric_records["metrics"])
        assert set(metrics) <= ALLOWED, set(metrics) - ALLOWED
        assert metrics[SGD_STEPS] > 0
        # every method but the weights-only ones releases statistics: 2 releases each
        assert metrics[RELEASES] == (0 if name in ("fedavg", "fedprox", "moon") else 2)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    row = strategy.report.row()
    assert row["clients"] == NUM_CLIENTS and row["failures"] == 0
    assert math.isnan(row["train_loss"])  # withheld
    assert row["epsilon"] == strategy.ledger.worst() > 0
    assert set(strategy.ledger.histories) == set(range(NUM_CLIENTS))


@pytest.mark.slow
def test_a_private_run_reports_epsilon_and_resumes_to_the_same_ledger(tmp_path):
    overrides = f"{OVERRIDES} privacy.noise_multiplier=1.0 privacy.stats_noise_multiplier=3.0"
    straight = simulate(tmp_path / "straight", 2, overrides=overrides)
    epsilons = [row["epsilon"] for row in straight["rounds"]]
    assert 0 < epsilons[0] < epsilons[1] == straight["privacy"]["epsilon"]
    assert set(straight["privacy"]["clients"]) == {"0", "1", "2"}
    assert straight["final_accuracy"] > 0.1  # it learns something under the noise
    simulate(tmp_path / "resumed", 1, overrides=overrides)
    resumed = simulate(tmp_path / "resumed", 2, resume=True, overrides=overrides)
    assert resumed["privacy"] == straight["privacy"]
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"]
                                                          for r in straight["rounds"]]


def test_private_statistics_without_noise_or_clipping_are_the_exact_ones():
    """At a vanishing multiplier and a clip no record reaches, the release is the statistic
    `extract_class_statistics` measures on every record: the same parts, summed right."""
    cfg = parse_experiment({"model": {"feature_dim": 16}})
    spec = dataset_spec(cfg)
    torch.manual_seed(0)
    model = sharing_for(cfg, get_method("fedhpro")).server_model(spec)
    x = torch.rand(60, *spec.input_shape)
    data = TensorData(x, torch.arange(60) % 4, num_classes=spec.num_classes)
    exact = extract_class_statistics(model, data, 60, 1, torch.Generator().manual_seed(0),
                                     torch.device("cpu"))
    released = private_class_statistics(model, data, private(sigma=1e-12, clip=1e3),
                                        torch.device("cpu"))
    assert torch.equal(released.present, exact.present)
    assert torch.equal(released.counts, exact.counts)
    for name in ("feature_grads", "weight_grads", "bias_grads", "feature_means",
                 "feature_vars"):
        assert torch.allclose(getattr(released, name), getattr(exact, name), atol=1e-4), name


def test_the_noise_for_a_budget_spends_that_budget_and_no_more():
    sizes, rounds = [90, 300, 300], 5
    sigmas = []
    for releases in (0, 2):
        sigma = noise_for_epsilon(4.0, 1e-5, sizes, 64, 2, rounds, releases)
        spent = run_epsilon(sigma, 1e-5, sizes, 64, 2, rounds, releases)
        assert 3.95 < spent <= 4.0
        assert run_epsilon(sigma / 1.01, 1e-5, sizes, 64, 2, rounds, releases) > 4.0
        sigmas.append(sigma)
    assert sigmas[1] > sigmas[0]  # the statistics cost budget: more noise for the same epsilon
    # noisier statistics leave DP-SGD more of the budget
    quieter = noise_for_epsilon(4.0, 1e-5, sizes, 64, 2, rounds, 2, stats_ratio=4.0)
    assert sigmas[0] < quieter < sigmas[1]
    assert 3.95 < run_epsilon(quieter, 1e-5, sizes, 64, 2, rounds, 2, 4.0) <= 4.0
    # the smallest client samples the most per step: it alone sets the run's epsilon
    assert run_epsilon(1.0, 1e-5, sizes, 64, 2, rounds, 0) == run_epsilon(1.0, 1e-5, [90], 64, 2,
                                                                           rounds, 0)


def test_a_gradient_no_record_moves_joins_dp_sgd_after_the_noise():
    """FedProx's pull to the global weights has no per-sample gradient for Opacus to clip:
    `public_gradient` adds it to the noised one. With no data gradient and (almost) no
    noise, each step is then w <- w - lr * mu * (w - w_start): the weights shrink to the start
    by (1 - lr * mu) a step."""
    model = nn.Linear(4, 2)

    backbone = head_only(model, 4)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # one away from the start everywhere
    data = TensorData(torch.zeros(30, 4), torch.zeros(30, dtype=torch.long), num_classes=2)
    train = TrainConfig(local_epochs=1, batch_size=10, lr=0.1)  # 3 steps

    def no_gradient(x, y):
        loss = 0.0 * backbone(x).sum()
        return loss, loss

    @torch.no_grad()
    def pull():
        for p, s in zip(model.parameters(), start, strict=True):
            p.grad.add_(p - s, alpha=2.0)

    train_batches(backbone, data, train, torch.Generator().manual_seed(0), torch.device("cpu"),
                  no_gradient, privacy=private(sigma=1e-9, seed=6), public_gradient=pull)
    for p, s in zip(model.parameters(), start, strict=True):
        assert torch.allclose(p - s, torch.full_like(p, (1 - 0.1 * 2.0) ** 3), atol=1e-5)


def test_a_client_smaller_than_a_batch_averages_over_its_records():
    """With fewer records than the batch size every record is in every step (rate 1): the
    noised gradient is averaged over the records, not over the batch size it never fills."""
    model = nn.Linear(1, 1, bias=False)

    backbone = head_only(model, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    data = TensorData(torch.ones(8, 1), torch.zeros(8, dtype=torch.long), num_classes=1)
    train = TrainConfig(local_epochs=1, batch_size=64, lr=1.0)

    def linear(x, y):  # each record's gradient w.r.t. the weight is -0.1, within the clip
        loss = -0.1 * backbone(x).mean()
        return loss, loss

    privacy = private(sigma=1e-9, seed=7)
    train_batches(backbone, data, train, torch.Generator().manual_seed(0), torch.device("cpu"),
                  linear, privacy=privacy)
    assert (privacy.sample_rate, privacy.sgd_steps) == (1.0, 1)
    assert model.weight.item() == pytest.approx(0.1, rel=1e-4)  # the mean, not 8 / 64 of it


def test_a_public_gradient_may_run_the_model_on_what_is_no_batch_of_records():
    """FedSA's calibration runs the head on the anchors, not on records: in the loss, Opacus
    would add its gradient into the first records' per-sample gradients and clip it with them;
    as a public gradient it lands whole on every step."""
    model = nn.Linear(3, 1)

    backbone = head_only(model, 3)
    before = model.weight.detach().clone(), model.bias.detach().clone()
    anchor = torch.tensor([[1.0, 2.0, 3.0]])
    data = TensorData(torch.zeros(30, 3), torch.zeros(30, dtype=torch.long), num_classes=1)
    train = TrainConfig(local_epochs=1, batch_size=10, lr=0.1)  # 3 steps

    def no_gradient(x, y):
        loss = 0.0 * backbone(x).sum()
        return loss, loss

    def through_the_head():
        grads = torch.autograd.grad(model(anchor).sum(), [model.weight, model.bias])
        with torch.no_grad():
            model.weight.grad.add_(grads[0])
            model.bias.grad.add_(grads[1])

    train_batches(backbone, data, train, torch.Generator().manual_seed(0), torch.device("cpu"),
                  no_gradient, privacy=private(sigma=1e-9, seed=8),
                  public_gradient=through_the_head)
    assert torch.allclose(model.weight, before[0] - 0.3 * anchor, atol=1e-5)
    assert torch.allclose(model.bias, before[1] - 0.3, atol=1e-5)
