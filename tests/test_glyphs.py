"""The generated many-class glyph benchmark: its class list, its images, its cache, a run."""

import numpy as np
import pytest
from simulate import simulate

from fedhpro_flwr.config import ConfigError, DataConfig
from fedhpro_flwr.data import glyphs
from fedhpro_flwr.data.sources import load_source

# Glyphs that read as the same shape (across scripts, cases, letter / digit / symbol): at most
# one of each group may be a class (written as escapes: they are look-alikes in source too).
LOOK_ALIKES = ("A\u0391\u0410", "B\u0392\u0412", "E\u0395\u0415", "H\u0397\u041d",
               "K\u039a\u041a", "M\u039c\u041c", "P\u03a1\u0420", "T\u03a4\u0422",
               "X\u03a7\u0425\u03c7x\u0445", "Y\u03a5", "0Oo\u039f\u03bf\u041e\u043e",
               "lI1|\u0399\u0456", "cC\u0441\u0421", "sS", "vV", "wW", "zZ", "p\u0440", "y\u0443",
               "e\u0435")


@pytest.fixture(scope="module")
def tiny():
    return glyphs.generate(5, 4, 2)


def test_images_are_uint8_rgb_32x32_grouped_by_class(tiny):
    assert tiny["x_train"].shape == (20, 3, 32, 32) and tiny["x_train"].dtype == np.uint8
    assert tiny["x_test"].shape == (10, 3, 32, 32) and tiny["x_test"].dtype == np.uint8
    assert tiny["y_train"].tolist() == [c for c in range(5) for _ in range(4)]
    assert tiny["y_test"].tolist() == [c for c in range(5) for _ in range(2)]
    x = tiny["x_train"].astype(np.float64)
    assert np.abs(x[:, 0] - x[:, 1]).mean() > 10.0  # in colour
    assert x.std(axis=(1, 2, 3)).min() > 10.0  # no blank image
    assert len({img.tobytes() for img in tiny["x_train"]}) == 20  # no two alike


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others(tiny):
    again = glyphs.generate(5, 4, 2)
    assert all(np.array_equal(tiny[k], again[k]) for k in tiny)
    other = glyphs.generate(5, 4, 2, seed=1)
    assert not np.array_equal(tiny["x_train"], other["x_train"])


def test_the_class_list_holds_400_distinct_glyphs_each_in_several_fonts():
    assert len(glyphs.CLASSES) >= 400 and len(set(glyphs.CLASSES)) == len(glyphs.CLASSES)
    assert all(len(glyphs.fonts_for(ord(ch))) >= glyphs.MIN_FONTS for ch in glyphs.CLASSES)
    assert glyphs.class_names(3) == ("U+0030", "U+0031", "U+0032")


def test_no_two_classes_look_alike():
    for group in LOOK_ALIKES:
        assert sum(ch in glyphs.CLASSES for ch in group) <= 1, group
    images = np.stack([glyphs.render(glyphs.REFERENCE_FONT, ch, box=24, canvas=32)
                       for ch in glyphs.CLASSES])
    sim = glyphs.similarity(images)
    np.fill_diagonal(sim, -1.0)
    assert sim.max() < glyphs.SIMILARITY_THRESHOLD


def test_the_frozen_list_is_what_the_criterion_selects():
    assert glyphs.select_classes() == glyphs.CLASSES


def test_the_cache_is_written_once_and_read_after(tmp_path, monkeypatch):
    first = glyphs.load(tmp_path, 5, 5)
    files = list(tmp_path.glob("glyphs-5x5+1-*.npz"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("generated again instead of read from the cache")

    monkeypatch.setattr(glyphs, "generate", fail)
    again = glyphs.load(tmp_path, 5, 5)
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_the_source_has_an_official_test_split_and_named_classes(tmp_path):
    splits = load_source(DataConfig(dataset="glyphs-100", root=str(tmp_path),
                                    samples_per_class=5))
    assert splits.num_classes == 100 and splits.train.x.shape == (500, 3, 32, 32)
    assert splits.test is not None and np.bincount(splits.test.y).tolist() == [1] * 100
    assert splits.class_names()[:2] == ("U+0030", "U+0031") and len(splits.classes) == 100


@pytest.mark.parametrize(("dataset", "count"), [("mnist-subset", 20), ("glyphs-400", 4)])
def test_samples_per_class_is_only_for_glyphs_and_at_least_5(dataset, count):
    with pytest.raises(ConfigError, match=r"data\.samples_per_class"):
        DataConfig(dataset=dataset, samples_per_class=count)


@pytest.mark.slow
def test_two_federated_rounds_on_a_small_glyph_set(tmp_path):
    overrides = (f"data.root={tmp_path / 'data'} data.samples_per_class=20 "
                 "partition.num_partitions=3 train.local_epochs=1")
    results = simulate(tmp_path / "run", rounds=2, strategy="fedavg",
                       config="conf/glyphs100-lt.yaml", overrides=overrides)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["clients"] == 3 and r["failures"] == 0 for r in results["rounds"])
    assert results["config"]["data"]["dataset"] == "glyphs-100"
    assert results["initial"]["accuracy"] < 0.05  # an untrained 100-class model
    # 20 images a class cut to a long tail: two rounds teach the clients their head classes
    # (their loss falls: 4.71 -> 4.18 on seed 536), not yet the balanced test set
    first, second = results["rounds"]
    assert second["train_loss"] < first["train_loss"] - 0.1
    assert first["train_ce"] == first["train_loss"]  # FedAvg's loss is all cross-entropy
