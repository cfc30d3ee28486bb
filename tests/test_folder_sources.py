"""Image-folder sources (SYN, Office-Caltech, Tiny-ImageNet, SUN397) and the Digits composite,
read from small trees written here in each dataset's distributed layout."""

import os

import numpy as np
import pytest
from scipy.io import savemat

from fedhpro_flwr.data.federated import client_data, held_out_data
from fedhpro_flwr.data.imagefiles import fit
from fedhpro_flwr.data.sources import DataMissing, load_source
from fedhpro_flwr.methods import parse_experiment
from tests.images import color_of, write_class_folders, write_image
from tests.test_sources import source, write_mnist_like

DIGITS = [str(d) for d in range(10)]


def write_syn(root, per_class=2):
    write_class_folders(root / "syn" / "train", DIGITS, per_class, size=(32, 32))
    write_class_folders(root / "syn" / "val", DIGITS, 1, size=(28, 36))


def test_syn_reads_train_and_val_folders_labelled_by_digit(tmp_path):
    write_syn(tmp_path)
    splits = load_source(source("syn", tmp_path))
    assert splits.train.x.shape == (20, 3, 32, 32) and splits.train.x.dtype == np.uint8
    assert splits.test is not None and splits.test.x.shape == (10, 3, 32, 32)
    for x, y in zip(splits.test.x, splits.test.y, strict=True):  # resized, colour kept
        assert (x.reshape(3, -1) == np.array(color_of(int(y)))[:, None]).all()


def test_image_size_resizes_any_source(tmp_path):
    write_syn(tmp_path)
    splits = load_source(source("syn", tmp_path, image_size=16))
    assert splits.train.x.shape[1:] == (3, 16, 16) and splits.test.x.shape[1:] == (3, 16, 16)
    write_mnist_like(tmp_path, "MNIST")
    assert load_source(source("mnist", tmp_path, image_size=32)).train.x.shape[1:] == (1, 32, 32)


def test_fit_turns_grey_into_colour_and_back():
    grey = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 1, 8, 8)
    colour = fit(grey, 8, 3)
    assert colour.shape == (2, 3, 8, 8) and (colour == grey).all()
    assert np.array_equal(fit(colour, 8, 1), grey)  # the luma weights add up to one
    assert fit(grey, 4, 1).shape == (2, 1, 4, 4)


def test_decoded_folders_are_cached_and_the_cache_follows_the_files(tmp_path):
    write_syn(tmp_path)
    first = load_source(source("syn", tmp_path))
    cached = sorted((tmp_path / "cache").glob("syn-train-32px-*.npy"))
    assert len(cached) == 1
    assert np.array_equal(np.load(cached[0]), first.train.x)
    changed = tmp_path / "syn" / "train" / "3" / "0.png"
    write_image(changed, (1, 2, 3), (32, 32))
    os.utime(changed, ns=(1, 1))  # a different file state, whatever the clock's resolution
    second = load_source(source("syn", tmp_path))
    assert len(list((tmp_path / "cache").glob("syn-train-32px-*.npy"))) == 2
    index = 3 * 2  # class 3's first file, after classes 0-2's two files each
    assert (second.train.x[index].reshape(3, -1) == np.array([[1], [2], [3]])).all()


def write_usps(root, n_train=10, n_test=10):
    import bz2

    for filename, n in (("usps.bz2", n_train), ("usps.t.bz2", n_test)):
        lines = [f"{i % 10 + 1} " + " ".join(f"{j + 1}:0.5" for j in range(256))
                 for i in range(n)]
        (root / filename).write_bytes(bz2.compress("\n".join(lines).encode()))


def write_svhn(root, n_train=10, n_test=10):
    for filename, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = np.full((32, 32, 3, n), 77, dtype=np.uint8)
        savemat(str(root / filename), {"X": x, "y": (np.arange(n) % 10 + 1).reshape(-1, 1)})


def test_digits_joins_mnist_usps_svhn_and_syn_as_four_domains(tmp_path):
    write_mnist_like(tmp_path, "MNIST", n_train=20, n_test=10)
    write_usps(tmp_path)
    write_svhn(tmp_path)
    write_syn(tmp_path, per_class=1)
    splits = load_source(source("digits", tmp_path))
    assert splits.domains == ("mnist", "usps", "svhn", "syn")
    assert splits.train.x.shape == (20 + 10 + 10 + 10, 3, 32, 32)
    assert np.bincount(splits.train.domain).tolist() == [20, 10, 10, 10]
    assert np.bincount(splits.test.domain).tolist() == [10, 10, 10, 10]
    mnist = splits.train.x[splits.train.domain == 0]
    assert (mnist[:, 0] == mnist[:, 1]).all() and (mnist[:, 1] == mnist[:, 2]).all()  # grey
    assert (splits.train.x[splits.train.domain == 2] == 77).all()  # SVHN's pixels, untouched


def test_digits_names_the_first_missing_part(tmp_path):
    write_mnist_like(tmp_path, "MNIST")
    with pytest.raises(DataMissing, match=r"dataset 'usps' not found at .*usps\.bz2"):
        load_source(source("digits", tmp_path))


OFFICE_CLASSES = ["back_pack", "bike", "mug"]


def write_office(root, per_class=4):
    for domain in ("caltech", "amazon", "webcam", "dslr"):
        write_class_folders(root / "Office_Caltech_10" / domain, OFFICE_CLASSES, per_class,
                            suffix=".jpg", size=(60, 45))


def test_office_caltech_is_four_domains_of_named_classes(tmp_path):
    write_office(tmp_path)
    splits = load_source(source("office-caltech", tmp_path))
    assert splits.domains == ("caltech", "amazon", "webcam", "dslr")
    assert splits.classes == tuple(OFFICE_CLASSES) and splits.num_classes == 3
    assert splits.train.x.shape == (48, 3, 32, 32) and splits.test is None
    assert np.bincount(splits.train.domain).tolist() == [12] * 4
    # JPEG is lossy: the class colour survives to within a few levels
    for label in range(3):
        pixels = splits.train.x[splits.train.y == label].reshape(-1, 3, 32 * 32)
        assert np.abs(pixels.mean(axis=(0, 2)) - color_of(label)).max() < 4


def test_office_caltech_domain_clients_and_a_stratified_hold_out(tmp_path):
    write_office(tmp_path, per_class=10)
    cfg = parse_experiment({
        "data": {"dataset": "office-caltech", "root": str(tmp_path), "test_fraction": 0.2},
        "partition": {"scheme": "domains", "num_partitions": 6, "clients_per_domain": "3 1 1 1",
                      "alpha": 100.0, "min_size": 1},
    })
    test = held_out_data(cfg)
    assert test.domain_counts().tolist() == [6, 6, 6, 6]  # 20% of every (domain, class)
    clients = [client_data(cfg, i) for i in range(6)]
    assert [c.domains[int(c.domain[0])] for c in clients] == [
        "caltech", "caltech", "caltech", "amazon", "webcam", "dslr"]
    assert all(len(c.domain.unique()) == 1 for c in clients)
    assert sum(len(c) for c in clients) + len(test) == 120


def write_tiny_imagenet(root, wnids=("n02", "n01", "n03"), per_class=2):
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    ordered = sorted(wnids)
    for wnid in wnids:
        label = ordered.index(wnid)
        for i in range(per_class):
            write_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", color_of(label),
                        (64, 64))
    lines = []
    for i, wnid in enumerate(wnids):
        write_image(base / "val" / "images" / f"val_{i}.JPEG", color_of(ordered.index(wnid)),
                    (64, 64))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_uses_the_annotated_val_set_as_test(tmp_path):
    write_tiny_imagenet(tmp_path)
    splits = load_source(source("tiny-imagenet", tmp_path))
    assert splits.classes == ("n01", "n02", "n03")
    assert splits.train.x.shape == (6, 3, 64, 64) and splits.train.y.tolist() == [0, 0, 1, 1,
                                                                                   2, 2]
    assert splits.test.y.tolist() == [1, 0, 2]  # val_0 is n02, val_1 n01, val_2 n03


def test_sun397_reads_torchvision_layout_with_nested_class_paths(tmp_path):
    base = tmp_path / "SUN397"
    base.mkdir()
    (base / "ClassName.txt").write_text("/a/abbey\n/b/bus_station/indoor\n")
    for label, path in enumerate(("a/abbey", "b/bus_station/indoor")):
        for i in range(3):
            write_image(base / path / f"sun_{i}.jpg", color_of(label), (80, 50))
    splits = load_source(source("sun397", tmp_path))
    assert splits.classes == ("abbey", "bus_station_indoor")
    assert splits.train.x.shape == (6, 3, 64, 64) and splits.train.y.tolist() == [0] * 3 + [1] * 3


@pytest.mark.parametrize(("name", "looked_at"), [
    ("syn", "syn/train"), ("office-caltech", "Office_Caltech_10"),
    ("tiny-imagenet", "tiny-imagenet-200/wnids.txt"), ("sun397", "SUN397/ClassName.txt"),
])
def test_missing_folder_data_names_the_path_and_the_fix(tmp_path, name, looked_at):
    with pytest.raises(DataMissing) as info:
        load_source(source(name, tmp_path))
    message = str(info.value)
    assert f"dataset '{name}' not found at {tmp_path / looked_at}" in message
    assert "unpack" in message and "data.download=true" in message
