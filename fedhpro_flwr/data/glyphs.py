"""`glyphs-100`, `glyphs-400`: a many-class image benchmark drawn from matplotlib's fonts.

The paper's many-class settings (CIFAR-100-LT, Tiny-ImageNet, SUN397) need downloads; this one
needs only pip. Each class is one glyph (a letter of the Latin, Greek, Cyrillic, Armenian,
Georgian or Hebrew script, a digit, a symbol, an arrow, a math operator, a shape), drawn at
3 x 32 x 32 (CIFAR's size, so the CIFAR configs' models apply unchanged) in one of up to 21
fonts, with a random affine warp, stroke width, colours, textured background, a stray line,
blur and noise.

Classes must be told apart by shape, so look-alikes (Latin A, Greek Alpha, Cyrillic A; o, O,
0; l, I, 1, |) are one class at most. The criterion is measured, not listed by hand
(`select_classes`): every candidate is rendered in DejaVu Sans, fitted to a fixed box and
centred; a candidate joins the list, in `BLOCKS` order, unless its blurred rendering
correlates at `SIMILARITY_THRESHOLD` or more with that of a glyph already chosen, under any
of the aspect stretches in `ASPECTS` (the augmentation stretches glyphs too). The result is
frozen in `CLASSES`, so that class k means the same glyph on every machine; `glyphs-N` uses
its first N.

The images are a pure function of the class list, `GENERATOR_SEED` and `VERSION`, built once
and cached as .npz under ``data.root``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedhpro_flwr.data.digits_offline import font_dir
from fedhpro_flwr.data.npzcache import cached_arrays

VERSION = 2  # 1: stronger colour, texture, warp and line augmentation (barely learnable)
GENERATOR_SEED = 0
SIZE = 32  # output side; glyphs are drawn at twice this, then averaged down
TRAIN_PER_CLASS = {100: 500, 400: 120}  # and a fifth as many test images: CIFAR-100's 500 +
# 100 for 100 classes; 120 + 24 for 400, so a round costs about the same as with 100
FAMILIES = tuple(f"{family}{style}.ttf" for family, styles in (
    ("DejaVuSans", ("", "-Bold", "-Oblique", "-BoldOblique")),
    ("DejaVuSansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
    ("DejaVuSerif", ("", "-Bold", "-Italic", "-BoldItalic")),
    ("STIXGeneral", ("", "Bol", "Italic", "BolIta")),
) for style in styles)
# Computer Modern's TeX encoding puts other glyphs at some ASCII punctuation positions, so
# these draw ASCII letters and digits only.
COMPUTER_MODERN = ("cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf")
REFERENCE_FONT = "DejaVuSans.ttf"  # renders every candidate for the similarity test
MIN_FONTS = 4  # a candidate needs this many of FAMILIES (for variety within the class)
BLOCKS = (  # candidate code points, in the order classes are chosen
    (0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A),  # digits, Latin upper and lower case
    (0x391, 0x3A9), (0x3B1, 0x3C9), (0x410, 0x44F),  # Greek, Cyrillic
    (0x21, 0x7E), (0xA1, 0xFF),  # ASCII and Latin-1 symbols and letters
    (0x531, 0x556), (0x561, 0x587), (0x10D0, 0x10FA), (0x5D0, 0x5EA),  # Armenian, Georgian,
    (0x2190, 0x21FF), (0x2200, 0x22FF), (0x2100, 0x214F), (0x20A0, 0x20BF),  # Hebrew; arrows,
    (0x25A0, 0x25FF), (0x2300, 0x23FF), (0x2600, 0x26FF), (0x2700, 0x27BF),  # math, letterlike,
    (0x27C0, 0x27FF), (0x2980, 0x2AFF),  # currency, shapes, technical, dingbats, more math
)
SIMILARITY_THRESHOLD = 0.75
SIMILARITY_BLUR = 0.7  # Gaussian sigma, pixels of the 32-pixel reference rendering
ASPECTS = (1 / 1.5, 1 / 1.25, 1.0, 1.25, 1.5)  # width / height stretches compared
# select_classes() on matplotlib 3.11.2 (417 of its 1,553 candidates), as code points
CODE_POINTS = """
0030 0031 0032 0033 0034 0035 0037 0041 0043 0045 0048 004A 004B 0050 0051 0052 0054 0056
0057 0058 0059 0062 0066 006B 006D 006E 0072 03A6 03A8 03B2 03B6 03BB 03BC 03BD 03C2 03C9
0414 0416 0419 041B 0426 0427 0429 042A 042E 043C 044B 0023 0025 0026 0028 002B 002D 002E
002F 003A 003C 003E 0040 005C 005E 0060 00A7 00AA 00AB 00AC 00B1 00B4 00B6 00B8 00BB 00BC
00BF 00C6 00C7 00C8 00D0 00D1 00D2 00DD 00DE 00DF 00E0 00E6 00EE 00F1 0532 0533 0539 053A
053C 053D 053F 0540 0541 0543 0544 0546 0547 054B 054E 0552 0554 0556 057A 0586 0587 10D2
10D3 10D9 10DA 10DD 10E0 10E3 10E4 10ED 10EF 10F4 10F9 05D0 05D3 05DC 05DE 05E5 05E6 05E9
2196 2197 2198 2199 219F 21AF 21B0 21B1 21B2 21B3 21B4 21B5 21B6 21B7 21B8 21B9 21BA 21BB
21BC 21C4 21C5 21C6 21D1 21D6 21D7 21D8 21D9 21E0 21E2 21E3 21EF 21F1 21F5 2206 2209 220A
220C 220D 2211 2213 2214 2217 221A 221B 221D 221E 222D 2231 2234 2235 2237 2239 223F 2241
2246 224F 2252 2253 2257 225F 2263 2264 2265 2266 2267 2268 226D 2276 2277 2280 2281 2285
2286 228A 228B 228C 228F 2290 2297 22A9 22AB 22AC 22B0 22B1 22B4 22B5 22BB 22BF 22C8 22CB
22CC 22D1 22D4 22DA 22DB 22DC 22DD 22DE 22DF 22E0 22E1 22EF 22F0 22F1 22F2 22F6 22F8 22FA
22FD 2100 2103 2104 2109 210B 210C 210D 2111 2114 2115 2116 2117 2118 211B 211D 2121 2123
2128 212C 212D 212E 2130 2131 2132 2133 2135 213A 213C 213D 2145 2146 2147 2148 214B 20A0
20A4 20A7 20AA 20AB 20AD 20AF 20B0 20B4 20B9 20BA 25A2 25AD 25B7 25BD 25C1 25C7 25CA 25CC
25D1 25D2 25D3 25DC 25DD 25DE 25DF 25E0 25E1 25E2 25E3 25E4 25E5 25ED 25EE 25F8 25F9 25FA
25FF 2305 2306 230C 230D 230E 230F 2310 2318 2325 2326 2387 239E 23AC 23CE 23E3 23E8 2603
2604 2605 2606 2607 2608 2609 260A 260B 2611 2616 261C 261D 261E 261F 2621 2622 2625 262D
2631 263A 263C 263D 263F 2643 2645 2648 264A 264B 264C 264D 264F 2651 2653 2654 2656 2658
2661 2664 2667 2668 266A 266B 266C 266E 2672 2673 267B 267F 2690 2692 2693 2696 2697 2698
26A1 26A2 26A3 26A4 26B3 26B6 26B7 26C0 2703 2706 2707 270E 2710 271E 2729 2740 274A 2763
276F 2782 27A9 27B4 27B6 27F0 27F1 27F2 27F3 2A6A 2A6B 2A81 2A82 2A83 2A84 2A86 2A8A 2A99
2A9A 2A9F 2AAF
"""
CLASSES = "".join(chr(int(code, 16)) for code in CODE_POINTS.split())


def class_names(num_classes: int) -> tuple[str, ...]:
    """'U+0041'-style names: safe as folder names (a SuperNode's data-dir) on any file system."""
    return tuple(f"U+{ord(ch):04X}" for ch in CLASSES[:num_classes])


@cache
def _charmap(name: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(str(font_dir() / name)).get_charmap())


def fonts_for(code_point: int) -> tuple[str, ...]:
    """The fonts that map `code_point` to a glyph of their own."""
    ascii_alnum = code_point < 0x80 and chr(code_point).isalnum()
    names = FAMILIES + (COMPUTER_MODERN if ascii_alnum else ())
    return tuple(name for name in names if code_point in _charmap(name))


def render(font: str, ch: str, box: int, canvas: int) -> np.ndarray | None:
    """(canvas, canvas) float32 coverage of `ch`, its longer side scaled to `box` and its
    bounding box centred; None when the font draws no ink for it. Drawn at the size that
    makes the glyph about `box` pixels, so small glyphs (a dot) are not blown-up pixels."""
    from PIL import Image, ImageDraw, ImageFont

    def draw(size: int) -> Image.Image | None:
        face = ImageFont.truetype(str(font_dir() / font), size)
        image = Image.new("L", (4 * size, 4 * size), 0)
        ImageDraw.Draw(image).text((size, size), ch, font=face, fill=255)
        bbox = image.getbbox()
        return None if bbox is None else image.crop(bbox)

    probe = draw(2 * box)
    if probe is None:
        return None
    glyph = draw(max(4, round(2 * box * box / max(probe.size))))
    assert glyph is not None
    scale = box / max(glyph.size)
    width, height = (max(1, round(side * scale)) for side in glyph.size)
    glyph = glyph.resize((width, height), Image.LANCZOS)
    out = Image.new("L", (canvas, canvas), 0)
    out.paste(glyph, ((canvas - width) // 2, (canvas - height) // 2))
    return np.asarray(out, dtype=np.float32) / 255.0


def candidates() -> tuple[list[int], np.ndarray]:
    """Code points of `BLOCKS` that the reference font and `MIN_FONTS` of the families draw,
    with their reference renderings (N, 32, 32)."""
    reference = _charmap(REFERENCE_FONT)
    kept, images = [], []
    for first, last in BLOCKS:
        for code_point in range(first, last + 1):
            if code_point in kept or code_point not in reference:
                continue
            if sum(code_point in _charmap(f) for f in FAMILIES) < MIN_FONTS:
                continue
            image = render(REFERENCE_FONT, chr(code_point), box=24, canvas=SIZE)
            if image is not None and image.sum() >= 4.0:  # not a space or a hairline
                kept.append(code_point)
                images.append(image)
    return kept, np.stack(images)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with one sigma per image (B,)."""
    radius = 2
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(x.shape[1], 0)
    b, c, h, w = x.shape
    flat = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def similarity(images: np.ndarray) -> np.ndarray:
    """(N, N) the highest correlation between blurred renderings over the stretches in
    `ASPECTS`, symmetric."""
    x = torch.from_numpy(images)[:, None]

    def normed(batch: torch.Tensor) -> torch.Tensor:
        flat = _blur(batch, torch.full((len(batch),), SIMILARITY_BLUR)).flatten(1)
        flat = flat - flat.mean(1, keepdim=True)
        return flat / flat.norm(dim=1, keepdim=True)

    base = normed(x)
    best = torch.full((len(x), len(x)), -1.0)
    for aspect in ASPECTS:  # narrow one axis, so the glyph stays inside the frame
        theta = torch.tensor([[max(1.0, 1 / aspect), 0.0, 0.0], [0.0, max(1.0, aspect), 0.0]])
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
        stretched = normed(F.grid_sample(x, grid, align_corners=False))
        best = torch.maximum(best, stretched @ base.T)
    return torch.maximum(best, best.T).numpy()


def select_classes() -> str:
    """The class list by the criterion above (what `CLASSES` froze): greedy in `BLOCKS`
    order, a candidate kept unless it is too similar to one kept before it."""
    code_points, images = candidates()
    sim = similarity(images)
    chosen: list[int] = []
    for i in range(len(code_points)):
        if not chosen or sim[i, chosen].max() < SIMILARITY_THRESHOLD:
            chosen.append(i)
    return "".join(chr(code_points[i]) for i in chosen)


def glyph_bank(num_classes: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(G, 4, 32, 32) every class drawn once in every font that has it, at four stroke widths
    (thinned, as drawn, thickened by one and by two pixels at twice the output size), and for
    each class the indices of its drawings: samples are warped copies, never drawn again."""
    images, owned = [], []
    for ch in CLASSES[:num_classes]:
        drawn = [render(font, ch, box=3 * SIZE // 2, canvas=2 * SIZE)
                 for font in fonts_for(ord(ch))]
        drawn = [image for image in drawn if image is not None]
        if not drawn:
            raise RuntimeError(f"no font of matplotlib's draws {ch!r} (U+{ord(ch):04X})")
        owned.append(np.arange(len(images), len(images) + len(drawn)))
        images += drawn
    x = torch.from_numpy(np.stack(images))[:, None]
    strokes = torch.cat([-F.max_pool2d(-x, 3, 1, 1), x, F.max_pool2d(x, 3, 1, 1),
                         F.max_pool2d(x, 5, 1, 2)], 1)
    return F.avg_pool2d(strokes, 2).numpy(), owned


def _uniform(rng: np.random.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(low, high, shape).astype(np.float32))


def _texture(rng: np.random.Generator, count: int, cells: int) -> torch.Tensor:
    """(count, 3, 32, 32) smooth colour noise in [-0.5, 0.5] varying over `cells` cells."""
    coarse = _uniform(rng, -0.5, 0.5, count, 3, cells, cells)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)


def augment(bank: np.ndarray, drawing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, 3, 32, 32) uint8 images of the bank's drawings `drawing` (B,), each at a random
    stroke width, warped, coloured, textured, crossed by a line, blurred and noised; all
    batched tensor operations."""
    b = len(drawing)
    mask = torch.from_numpy(bank[drawing, rng.integers(0, bank.shape[1], b)])[:, None]
    # affine warp: output -> input coordinates, the inverse of rotate . shear . scale
    angle = rng.uniform(-np.pi / 12, np.pi / 12, b)
    scale = rng.uniform(0.75, 1.1, b)
    aspect = np.exp(rng.uniform(-0.15, 0.15, b))
    shear = rng.uniform(-0.2, 0.2, b)
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.einsum("bij,bjk,bkl->bil",
                        np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1),
                        np.stack([np.stack([np.ones(b), shear], -1),
                                  np.stack([np.zeros(b), np.ones(b)], -1)], 1),
                        np.stack([np.stack([scale * aspect, np.zeros(b)], -1),
                                  np.stack([np.zeros(b), scale / aspect], -1)], 1))
    inverse = np.linalg.inv(forward)
    shift = rng.uniform(-0.12, 0.12, (b, 2, 1))
    theta = torch.from_numpy(np.concatenate([inverse, -inverse @ shift], 2)).float()
    grid = F.affine_grid(theta, [b, 1, SIZE, SIZE], align_corners=False)
    mask = F.grid_sample(mask, grid, align_corners=False)
    mask = mask * _uniform(rng, 0.8, 1.0, b, 1, 1, 1)  # ink opacity
    # colours: a textured background, and ink at least 0.3 away in every channel
    base = _uniform(rng, 0.0, 1.0, b, 3, 1, 1)
    background = (base + _uniform(rng, 0.0, 0.3, b, 1, 1, 1) * _texture(rng, b, 4)
                  + _uniform(rng, 0.0, 0.15, b, 1, 1, 1) * _texture(rng, b, 8))
    ink = torch.remainder(base + _uniform(rng, 0.3, 0.7, b, 3, 1, 1), 1.0)
    ink = ink + _uniform(rng, 0.0, 0.2, b, 1, 1, 1) * _texture(rng, b, 4)
    image = background * (1 - mask) + ink * mask
    # a stray line across a quarter of the images, in a colour of its own
    coords = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE * 2 - 1
    direction = _uniform(rng, 0.0, np.pi, b, 1, 1)
    centre = _uniform(rng, -0.7, 0.7, b, 2, 1)
    distance = ((coords[None, None, :] - centre[:, :1]) * torch.sin(direction)
                - (coords[None, :, None] - centre[:, 1:]) * torch.cos(direction)).abs()
    width = _uniform(rng, 0.5, 1.0, b, 1, 1) * 2 / SIZE
    line = ((width - distance) * SIZE / 2 + 0.5).clamp(0, 1)
    line = (line * torch.from_numpy(rng.random(b) < 0.25).float()[:, None, None])[:, None]
    image = image * (1 - line) + _uniform(rng, 0.0, 1.0, b, 3, 1, 1) * line
    image = _blur(image, _uniform(rng, 0.0, 0.8, b))
    image = image + _uniform(rng, 0.0, 0.04, b, 1, 1, 1) * torch.from_numpy(
        rng.standard_normal((b, 3, SIZE, SIZE), dtype=np.float32))
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def generate(num_classes: int, train_per_class: int, test_per_class: int,
             seed: int = GENERATOR_SEED, chunk: int = 2048) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test: images (N, 3, 32, 32) uint8 grouped by class, each
    in a font drawn at random among its class's; deterministic given the arguments."""
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes = {num_classes}: the glyph list has 1..{len(CLASSES)}")
    rng = np.random.default_rng(seed)
    bank, owned = glyph_bank(num_classes)
    arrays = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(num_classes), per_class)
        drawing = np.concatenate([rng.choice(owned[c], per_class) for c in range(num_classes)])
        with torch.no_grad():
            arrays[f"x_{split}"] = np.concatenate(
                [augment(bank, drawing[i:i + chunk], rng) for i in range(0, len(labels), chunk)]
            ) if len(labels) else np.zeros((0, 3, SIZE, SIZE), dtype=np.uint8)
        arrays[f"y_{split}"] = labels.astype(np.int64)
    return arrays


def load(root: Path, num_classes: int, train_per_class: int = 0) -> dict[str, np.ndarray]:
    """`generate`'s arrays for `num_classes` with `train_per_class` training images per class
    (0 = `TRAIN_PER_CLASS`) and a fifth as many test images, from the cache under `root`
    (built and written on first use)."""
    train = train_per_class or TRAIN_PER_CLASS[num_classes]
    test = train // 5
    path = root / f"glyphs-{num_classes}x{train}+{test}-seed{GENERATOR_SEED}-v{VERSION}.npz"
    return cached_arrays(path, lambda: generate(num_classes, train, test))


if __name__ == "__main__":  # print the class list the criterion selects, to freeze it
    print(repr(select_classes()))
