import numpy as np
import pytest
import torch

from fedhpro_flwr.algorithms.extraction import extract_class_statistics, sample_per_class
from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.algorithms.training import domain_accuracies
from fedhpro_flwr.config import ConfigError, ExperimentConfig, PartitionConfig
from fedhpro_flwr.data import federated
from fedhpro_flwr.data.federated import (
    TensorData,
    client_data,
    dataset_spec,
    held_out_data,
    validation_data,
)
from fedhpro_flwr.data.partition import (
    dirichlet_partition,
    domain_partition,
    iid_partition,
    k_classes_partition,
    long_tail_subset,
    stratified_split,
)
from fedhpro_flwr.methods import parse_experiment


def test_dirichlet_partition_is_disjoint_complete_seeded_and_skewed():
    labels = np.repeat(np.arange(10), 200)
    parts = dirichlet_partition(labels, 10, 0.5, seed=1, min_size=10)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) == len(np.unique(joined))
    assert min(len(p) for p in parts) >= 10
    again = dirichlet_partition(labels, 10, 0.5, seed=1, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))

    def skew(alpha):  # mean over clients of the largest class share
        ps = dirichlet_partition(labels, 10, alpha, seed=2, min_size=1)
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in ps])

    assert skew(0.1) > skew(0.5) > skew(100.0)


def test_dirichlet_partition_refuses_impossible_min_size():
    with pytest.raises(ValueError, match="at least 50 samples"):
        dirichlet_partition(np.zeros(100, dtype=int), 10, 0.5, seed=0, min_size=50)


def test_stratified_split_holds_out_each_class_equally():
    labels = np.repeat(np.arange(4), 50)
    train, test = stratified_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 200
    assert np.bincount(labels[test]).tolist() == [10, 10, 10, 10]


def test_default_experiment_data():
    cfg = ExperimentConfig()
    held_out = held_out_data(cfg)
    clients = [client_data(cfg, i) for i in range(cfg.partition.num_partitions)]
    assert len(held_out) == 1000 and sum(len(c) for c in clients) == 4000
    assert held_out.x.shape[1:] == (1, 28, 28)
    assert held_out.class_counts().tolist() == [100] * 10
    with pytest.raises(ValueError, match="partition-id 10 is out of range"):
        client_data(cfg, 10)


def test_sample_per_class_grid():
    labels = torch.tensor([2, 0, 2, 2, 0, 3, 2])
    index, mask = sample_per_class(labels, 4, 3, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [2, 0, 3, 1]
    for c in range(4):
        picked = index[c][mask[c]]
        assert (labels[picked] == c).all() and len(picked.unique()) == len(picked)


def test_extraction_masks_absent_classes():
    cfg = ExperimentConfig(partition=PartitionConfig(alpha=0.05, num_partitions=10))
    data = next(d for d in (client_data(cfg, i) for i in range(10))
                if (d.class_counts() == 0).any())
    model = build_model(cfg.model, dataset_spec(cfg))
    stats = extract_class_statistics(model, data, 20, 2, torch.Generator().manual_seed(0),
                                     torch.device("cpu"))
    absent = data.class_counts() == 0
    assert torch.equal(stats.present, ~absent)
    for rows in (stats.feature_grads, stats.feature_means, stats.feature_vars):
        assert rows[absent].abs().sum() == 0
    # with room for every sample, the moments are those of all of the client's features
    whole = extract_class_statistics(model, data, 10_000, 1, torch.Generator().manual_seed(0),
                                     torch.device("cpu"))
    with torch.no_grad():
        z = model.features(data.x)
    for c in torch.nonzero(~absent).flatten().tolist():
        zc = z[data.y == c]
        assert torch.allclose(whole.feature_means[c], zc.mean(dim=0), atol=1e-5)
        assert whole.feature_vars[c].item() == pytest.approx(
            zc.var(dim=0, correction=0).mean().item(), rel=1e-4, abs=1e-7)
    assert stats.feature_grads[~absent].abs().sum(1).min() > 0



def test_extraction_without_the_classifier_gradients_measures_the_rest_alike():
    """A client that does not send them skips the C x C x d block; nothing else moves."""
    cfg = ExperimentConfig(partition=PartitionConfig(alpha=0.5, num_partitions=10))
    data = client_data(cfg, 3)
    model = build_model(cfg.model, dataset_spec(cfg))
    full, lean = (extract_class_statistics(model, data, 20, 2, torch.Generator().manual_seed(1),
                                           torch.device("cpu"), classifier=c)
                  for c in (True, False))
    assert lean.weight_grads is None and lean.bias_grads is None
    assert full.weight_grads is not None and full.weight_grads.shape == (10, 10, 128)
    for name in ("present", "counts", "feature_grads", "feature_means", "feature_vars"):
        assert torch.equal(getattr(full, name), getattr(lean, name)), name


def test_extraction_measures_the_same_in_any_chunk_size():
    """The features are computed a chunk at a time (64 on a CPU, 512 on a GPU by default):
    the statistics do not depend on it beyond float rounding."""
    cfg = ExperimentConfig(partition=PartitionConfig(alpha=0.5, num_partitions=10))
    data = client_data(cfg, 3)
    model = build_model(cfg.model, dataset_spec(cfg))
    default, gpu_sized, odd = (
        extract_class_statistics(model, data, 50, 1, torch.Generator().manual_seed(2),
                                 torch.device("cpu"), chunk=chunk)
        for chunk in (None, 512, 7))
    for other in (gpu_sized, odd):
        for name in ("feature_grads", "feature_means", "feature_vars", "weight_grads"):
            assert torch.allclose(getattr(default, name), getattr(other, name), atol=1e-6), name


def test_long_tail_counts_follow_the_exponential_profile():
    labels = np.repeat(np.arange(5), 400)
    keep = long_tail_subset(labels, imbalance_factor=100.0, seed=0)
    counts = np.bincount(labels[keep], minlength=5)
    expected = [int(400 * 100.0 ** (-c / 4)) for c in range(5)]  # 400, 126, 40, 12, 4
    assert counts.tolist() == expected == [400, 126, 40, 12, 4]
    assert len(np.unique(keep)) == len(keep)
    assert np.array_equal(keep, long_tail_subset(labels, 100.0, seed=0))
    assert not np.array_equal(keep, long_tail_subset(labels, 100.0, seed=1))  # which ones


def test_long_tail_experiment_keeps_a_balanced_test_set():
    cfg = parse_experiment({"partition": {"scheme": "long-tail",
                                                    "imbalance_factor": 20.0}})
    train = sum(client_data(cfg, i).class_counts() for i in range(10))
    assert train.tolist() == [int(400 * 20.0 ** (-c / 9)) for c in range(10)]
    assert held_out_data(cfg).class_counts().tolist() == [100] * 10


def test_k_classes_partition_gives_each_client_exactly_k_classes():
    labels = np.repeat(np.arange(10), 30)
    parts = k_classes_partition(labels, num_partitions=7, classes_per_client=3, seed=4)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) == len(np.unique(joined))  # disjoint and complete
    assert all(len(np.unique(labels[p])) == 3 for p in parts)
    again = k_classes_partition(labels, 7, 3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_k_classes_partition_refuses_what_cannot_cover_every_class():
    labels = np.repeat(np.arange(10), 5)
    with pytest.raises(ValueError, match="cannot hold all 10 classes"):
        k_classes_partition(labels, 4, 2, seed=0)
    with pytest.raises(ValueError, match="exceeds the 10 classes"):
        k_classes_partition(labels, 4, 11, seed=0)


def test_uci_digits_is_the_offline_8x8_source():
    cfg = parse_experiment({"data": {"dataset": "uci-digits"}})
    test = held_out_data(cfg)
    train = [client_data(cfg, i) for i in range(10)]
    assert test.x.shape[1:] == (1, 8, 8)
    assert len(test) + sum(len(c) for c in train) == 1797
    model = build_model(cfg.model, dataset_spec(cfg))
    assert model(test.x[:4]).shape == (4, 10)


def test_domain_partition_gives_each_client_one_domain():
    labels = np.tile(np.repeat(np.arange(5), 40), 3)  # 3 domains x 5 classes x 40
    domains = np.repeat(np.arange(3), 200)
    parts = domain_partition(labels, domains, num_partitions=7, alpha=0.5, seed=0, min_size=5)
    joined = np.concatenate(parts)
    assert len(joined) == 600 == len(np.unique(joined))  # disjoint and complete
    assert [int(np.unique(domains[p])[0]) for p in parts] == [0, 1, 2, 0, 1, 2, 0]
    assert all(len(np.unique(domains[p])) == 1 for p in parts)
    half = domain_partition(labels, domains, 3, alpha=1000.0, seed=0, min_size=5, fraction=0.5)
    assert [len(p) for p in half] == [100, 100, 100]  # FPL's setting: a share of the domain
    with pytest.raises(ValueError, match="2 clients cannot cover 3 domains"):
        domain_partition(labels, domains, 2, 0.5, seed=0)


def test_domain_partition_with_fpl_client_counts_and_per_client_shares():
    labels = np.tile(np.repeat(np.arange(5), 40), 3)  # 3 domains x 5 classes x 40
    domains = np.repeat(np.arange(3), 200)
    parts = domain_partition(labels, domains, 6, alpha=1000.0, seed=0, min_size=1,
                             clients_per_domain=(1, 3, 2), client_fraction=0.1)
    assert [int(domains[p][0]) for p in parts] == [0, 1, 1, 1, 2, 2]
    assert all(len(np.unique(domains[p])) == 1 for p in parts)
    sizes = [len(p) for p in parts]  # 10% of its 200-image domain each, up to the rounding
    assert sum(sizes) == 120 and all(15 <= n <= 25 for n in sizes)  # of per-class cuts
    assert len(np.unique(np.concatenate(parts))) == 120  # disjoint
    with pytest.raises(ValueError, match="need more than the whole domain"):
        domain_partition(labels, domains, 6, 0.5, 0, clients_per_domain=(1, 3, 2),
                         client_fraction=0.5)
    with pytest.raises(ValueError, match="must give each of the 3 domains"):
        domain_partition(labels, domains, 6, 0.5, 0, clients_per_domain=(3, 3))


@pytest.mark.parametrize("text", ["3 x", "2 2", "0 10", "-1 11"])
def test_clients_per_domain_is_checked_when_the_config_is_read(text):
    with pytest.raises(ConfigError, match=r"partition\.clients_per_domain"):
        parse_experiment({"partition": {"num_partitions": 10,
                                                  "clients_per_domain": text}})


def test_domain_accuracies_split_the_overall_accuracy():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    data = TensorData(x, torch.tensor([0, 1, 1, 1]), 2, torch.tensor([0, 0, 1, 1]), ("a", "b"))
    model = torch.nn.Linear(2, 2)  # predicts the larger coordinate
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    scores = domain_accuracies(model, data, torch.device("cpu"))
    assert scores == {"accuracy_a": 1.0, "accuracy_b": 0.5}


def test_scheme_domains_needs_a_multi_domain_dataset():
    cfg = parse_experiment({"partition": {"scheme": "domains"}})
    with pytest.raises(ValueError, match="needs a multi-domain dataset"):
        client_data(cfg, 0)


def test_validation_share_is_disjoint_stratified_seeded_and_balanced_under_a_long_tail():
    def split(seed, **partition):
        cfg = parse_experiment({"seed": seed, "data": {"validation_fraction": 0.1},
                                "partition": partition})
        return cfg, federated._split(cfg)

    cfg, parts = split(3)
    assert parts.validation is not None and parts.test is not None
    train = np.concatenate(parts.clients)
    # 10% of the 4,000-sample training pool, every class alike; no sample in two places
    assert len(parts.validation) == 400
    assert validation_data(cfg).class_counts().tolist() == [40] * 10
    everything = np.concatenate([train, parts.test, parts.validation])
    assert len(np.unique(everything)) == len(everything) == 5000
    # the test hold-out is the one a run without validation has; the clients get the rest
    plain = federated._split(parse_experiment({"seed": 3}))
    assert np.array_equal(plain.test, parts.test) and plain.validation is None
    assert np.array_equal(split(3)[1].validation, parts.validation)  # seeded
    assert not np.array_equal(split(4)[1].validation, parts.validation)
    # a long-tailed training pool keeps a balanced validation share, like its test set
    lt_cfg, lt = split(3, scheme="long-tail", imbalance_factor=20)
    assert validation_data(lt_cfg).class_counts().tolist() == [40] * 10
    counts = np.bincount(_labels(lt_cfg)[np.concatenate(lt.clients)], minlength=10)
    assert counts[0] > 10 * counts[9]


def _labels(cfg):
    return federated.load_dataset(cfg.data)[0].y.numpy()


LABELS = np.tile(np.repeat(np.arange(5), 40), 3)  # 3 domains x 5 classes x 40
DOMAINS = np.repeat(np.arange(3), 200)
SPLITS = {
    "iid": lambda seed: iid_partition(600, 4, seed),
    "stratified": lambda seed: list(stratified_split(LABELS, 0.25, seed)),
    "domains": lambda seed: domain_partition(LABELS, DOMAINS, 6, 0.5, seed, min_size=5),
}


@pytest.mark.parametrize("scheme", sorted(SPLITS))
def test_splits_repeat_with_the_seed_and_change_with_it(scheme):
    split = SPLITS[scheme]
    same, again, other = split(0), split(0), split(1)
    assert all(np.array_equal(a, b) for a, b in zip(same, again, strict=True))
    assert [len(p) for p in same] == [len(p) for p in other] or scheme == "domains"
    assert not all(np.array_equal(a, b) for a, b in zip(same, other, strict=True))


@pytest.mark.parametrize("dataset", ["digits-offline", "uci-digits"])
def test_cached_partition_is_the_partition_and_is_read_back_from_disk(tmp_path, monkeypatch,
                                                                      dataset):
    cfg = parse_experiment({"data": {"dataset": dataset, "root": str(tmp_path)},
                            "partition": {"scheme": "domains" if dataset == "digits-offline"
                                          else "dirichlet", "num_partitions": 4}})
    want = client_data(cfg, 2)
    got = federated.cached_client_data(cfg, 2)
    path = federated.partition_cache_path(cfg, 2)
    assert path.is_file() and path.parent == tmp_path / "partitions"
    # a later process finds the file: the dataset is not loaded again
    monkeypatch.setattr(federated, "client_data", lambda *a: pytest.fail("dataset reloaded"))
    again = federated.cached_client_data(cfg, 2)
    for data in (got, again):
        assert torch.equal(data.x, want.x) and torch.equal(data.y, want.y)
        assert data.num_classes == want.num_classes and data.domains == want.domains
        assert (data.domain is None) == (want.domain is None)
        if want.domain is not None:
            assert torch.equal(data.domain, want.domain)
    # anything that determines the partition names another file
    other = parse_experiment({"data": {"dataset": dataset, "root": str(tmp_path)}, "seed": 1,
                              "partition": cfg.partition.__dict__})
    assert federated.partition_cache_path(other, 2) != path
    assert federated.partition_cache_path(cfg, 1) != path
