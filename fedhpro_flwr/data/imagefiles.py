"""Image files on disk -> uint8 arrays of one size: class folders, resizing and a decode cache.

Folder datasets (SYN, Office-Caltech, Tiny-ImageNet, SUN397, a SuperNode's own images) hold
images of mixed sizes and modes, so every image is decoded, converted to the experiment's
channels and resized to one square size. Decoding tens of thousands of JPEGs takes minutes,
and every ClientApp process of a deployment would repeat it, so the decoded arrays are cached
next to the data, keyed by the file list, the sizes and the modification times of the files.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's "L" mode
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder`, in a fixed (sorted) order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))


def class_folders(folder: Path) -> list[Path]:
    """The sub-folders of `folder` that hold at least one image, sorted by name."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and image_files(d))


def labelled_files(folder: Path, classes: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """The images of a class-folder layout (`folder/<class name>/...`), labelled by the class
    name's position in `classes`; a class without a folder has no images."""
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = image_files(folder / name) if (folder / name).is_dir() else []
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def decode(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file as (channels, size, size) uint8."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        image = image.resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else np.ascontiguousarray(array.transpose(2, 0, 1))


def decode_all(paths: Sequence[Path], size: int, channels: int) -> np.ndarray:
    """(N, channels, size, size) uint8; an unreadable file stops with its path."""
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = decode(path, size, channels)
        except OSError as exc:
            raise OSError(f"cannot read image {path}: {exc}") from exc
    return out


def fit(x: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Resize uint8 images (N, C, H, W) to (N, channels, size, size): grey images are repeated
    to three channels, colour ones turned grey with PIL's luma weights; resizing is bilinear
    with antialiasing."""
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = np.repeat(x, 3, axis=1)
        else:
            luma = np.tensordot(x.astype(np.float32), LUMA, axes=([1], [0]))[:, None]
            x = np.round(luma).astype(np.uint8)
    if x.shape[2:] == (size, size):
        return x
    out = np.empty((len(x), channels, size, size), dtype=np.uint8)
    for start in range(0, len(x), 4096):  # bounded float memory
        chunk = torch.from_numpy(np.ascontiguousarray(x[start:start + 4096])).float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)
        out[start:start + 4096] = resized.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def cached_decode(paths: Sequence[Path], size: int, channels: int, cache_dir: Path,
                  name: str) -> np.ndarray:
    """`decode_all`, cached in `cache_dir` under a key of the files and the target size."""
    key = hashlib.sha256(f"{size}-{channels}".encode())
    for path in paths:
        stat = path.stat()
        key.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    cache = cache_dir / f"{name}-{size}px-{key.hexdigest()[:16]}.npy"
    if cache.is_file():
        return np.load(cache)
    x = decode_all(paths, size, channels)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy.part")
    except OSError:
        return x  # a read-only data folder: decode again next time
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, x)
        os.replace(tmp, cache)  # atomic: concurrent clients never see half a file
    finally:
        Path(tmp).unlink(missing_ok=True)
    return x
