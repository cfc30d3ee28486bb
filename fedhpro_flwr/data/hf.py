"""`hf:<name>`: any Hugging Face dataset with an image or text column and a class label,
read through flwr-datasets.

The whole "train" split (and "test" when there is one) is read once and then partitioned by
this package's own partitioners, so an `hf:` dataset gets exactly the same partitions,
held-out set and per-method treatment as the built-in sources. `<name>` is a Hub id
("uoft-cs/cifar10") or a local folder that `datasets.load_dataset` can read. Nothing is
fetched unless `data.download` is true; otherwise the dataset must already be in the cache
(`<data.root>/huggingface`) or on disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedhpro_flwr.config import ConfigError, DataConfig
from fedhpro_flwr.data import text
from fedhpro_flwr.data.samples import DataMissing, Samples, Splits


def _columns(features: Any, name: str) -> tuple[str, str, bool]:
    """(input column, label column, is_text) picked from the dataset's declared features."""
    from datasets import ClassLabel, Image, Value

    labels = [k for k, f in features.items() if isinstance(f, ClassLabel)]
    images = [k for k, f in features.items() if isinstance(f, Image)]
    texts = [k for k, f in features.items() if isinstance(f, Value) and f.dtype == "string"]
    if not labels or not (images or texts):
        raise ConfigError(f"dataset 'hf:{name}' needs a class-label column and an image or "
                          f"text column; its columns are {dict(features)}")
    return (images or texts)[0], labels[0], not images


def _images(column: list[Any], size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(column), 3, size, size), dtype=np.uint8)
    for i, image in enumerate(column):
        image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    return out


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """The HF_HUB_OFFLINE switch for one call: `local_files_only` alone still sends requests
    to the Hub (and waits out their retries on a machine without internet)."""
    import datasets.config
    import huggingface_hub.constants

    modules = (datasets.config, huggingface_hub.constants)
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = offline or m.HF_HUB_OFFLINE
    try:
        yield
    finally:
        for m, value in zip(modules, saved, strict=True):
            m.HF_HUB_OFFLINE = value


def load_hf(name: str, data: DataConfig) -> Splits:
    """The `Splits` of a Hugging Face dataset (images as RGB at data.image_size, or the size
    of the first image when that is 0; text hashed to token ids)."""
    try:
        from datasets import DownloadConfig
        from flwr_datasets import FederatedDataset
    except ImportError as exc:
        raise ConfigError(f"dataset 'hf:{name}' needs flwr-datasets ({exc}); "
                          "pip install 'flwr-datasets>=0.6'") from None
    cache = Path(data.root).expanduser() / "huggingface"
    fds = FederatedDataset(dataset=name, partitioners={"train": 1}, shuffle=False,
                           cache_dir=str(cache),
                           download_config=DownloadConfig(local_files_only=not data.download))
    with _hub_offline(not data.download):
        try:
            train = fds.load_split("train")
        except Exception as exc:  # datasets raises many kinds; all mean "not readable here"
            raise DataMissing(f"dataset 'hf:{name}' could not be read from {cache} or from "
                              f"disk ({type(exc).__name__}: {exc}); set data.download=true on a "
                              "machine that is online, or give a local folder") from None
        splits = [train]
        with contextlib.suppress(ValueError):  # no test split: a share of train is held out
            splits.append(fds.load_split("test"))
    column, label, is_text = _columns(train.features, name)
    classes = tuple(train.features[label].names)
    size = data.image_size
    samples = []
    for split in splits:
        y = np.asarray(split[label], dtype=np.int64)
        if is_text:
            x = text.encode(split[column], data.text_buckets, data.max_tokens)
        else:
            images = split[column]
            size = size or images[0].size[0]
            x = _images(images, size)
        samples.append(Samples(x, y))
    return Splits(samples[0], samples[1] if len(samples) > 1 else None, len(classes),
                  classes=classes)
