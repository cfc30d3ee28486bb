"""The offline multi-domain Digits benchmark: sizes, determinism, and four distinct domains."""

import numpy as np
import pytest

from fedhpro_flwr.data import digits_offline


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return root, digits_offline.load(root)  # generates and caches


def test_four_domains_of_ten_classes_at_32x32(generated):
    _, (x, y, domain) = generated
    assert x.shape == (9297, 3, 32, 32) and x.dtype == np.uint8
    assert np.bincount(domain).tolist() == [2500, 1797, 2500, 2500]
    for d in (0, 2, 3):
        assert np.bincount(y[domain == d]).tolist() == [250] * 10
    assert np.bincount(y[domain == 1], minlength=10).min() >= 170  # UCI's own counts


def test_the_cache_returns_the_same_images(generated):
    root, (x, y, domain) = generated
    again = digits_offline.load(root)  # read from the .npz this time
    assert all(np.array_equal(a, b) for a, b in zip((x, y, domain), again, strict=True))


@pytest.mark.slow
def test_generation_is_deterministic(generated):
    _, first = generated
    second = digits_offline.generate()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_domains_are_distinct(generated):
    _, (x, _, domain) = generated
    pixels = [x[domain == d].astype(np.float64) for d in range(4)]
    colour = [np.abs(p[:, 0] - p[:, 1]).mean() + np.abs(p[:, 1] - p[:, 2]).mean()
              for p in pixels]
    assert colour[0] == colour[1] == 0.0  # MNIST and UCI are grey
    assert min(colour[2], colour[3]) > 20.0  # synthetic and MNIST-M are in colour
    background = [p[:, :, :3, :3].mean() for p in pixels]  # top-left corner
    assert background[0] < 5.0 and background[2] > 50.0  # black vs coloured backgrounds
    ink = [(p[:, 0] > 128).mean() for p in pixels[:2]]
    assert ink[1] > 2 * ink[0]  # upsampled UCI digits fill their frame; MNIST's are padded
    means = [p.mean(axis=0) for p in pixels]
    gaps = [np.abs(means[a] - means[b]).mean() for a in range(4) for b in range(a + 1, 4)]
    assert min(gaps) > 5.0  # every pair of domains differs on average
