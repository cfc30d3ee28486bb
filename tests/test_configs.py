"""Every shipped experiment in conf/ is valid and, here, either builds its data and model or
stops with the missing-data message (the datasets that need files are looked for in an empty
folder; the generated glyph sets are built there, small)."""

from pathlib import Path

import pytest
import torch

from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.data.federated import client_data, dataset_spec
from fedhpro_flwr.data.sources import DataMissing
from fedhpro_flwr.methods import load_experiment

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "conf").glob("*.yaml"))
OFFLINE = ("mnist-subset", "uci-digits", "digits-offline", "glyphs-100", "glyphs-400")


def test_the_paper_setups_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"default", "digits", "office-caltech", "cifar10-lt", "cifar100-lt", "cifar10-dir",
            "agnews", "mnist-dir0.1", "mnist-dir0.5", "mnist-lt", "hetero",
            "hetero-paper", "glyphs100-lt", "glyphs100-dir0.1", "glyphs400-lt",
            "glyphs400-dir0.1"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_or_names_the_missing_data(path, tmp_path):
    cfg = load_experiment(path, {"data.root": str(tmp_path)})  # nothing written outside tmp
    if cfg.data.dataset.startswith("glyphs-"):  # generated: a small set
        cfg = load_experiment(path, {"data.root": str(tmp_path), "data.samples_per_class": 20})
    if cfg.data.dataset not in OFFLINE:
        with pytest.raises(DataMissing, match=f"not found at {tmp_path}"):
            dataset_spec(cfg)
        return
    spec = dataset_spec(cfg)
    data = client_data(cfg, cfg.partition.num_partitions - 1)
    for backbone in cfg.model.backbone_list() or (None,):  # every client's, when they differ
        model = build_model(cfg.model, spec, backbone)
        shared_dim = cfg.model.feature_dim if backbone else model.feature_dim
        assert model.features(data.x[:2]).shape == (2, shared_dim)
        assert model(data.x[:2]).shape == (2, spec.num_classes)
    assert torch.isfinite(data.x).all()
