"""`hf:<name>` through flwr-datasets, on datasets written here in formats `datasets` reads
(an image folder; Parquet with the feature metadata), with downloading off."""

import flwr_datasets  # noqa: F401  a declared dependency: a broken install fails here
import numpy as np
import pytest

from fedhpro_flwr.config import ConfigError
from fedhpro_flwr.data.federated import client_data, dataset_spec, held_out_data
from fedhpro_flwr.data.sources import DataMissing, load_source
from fedhpro_flwr.data.text import token_ids
from fedhpro_flwr.methods import parse_experiment
from tests.images import color_of, write_class_folders
from tests.test_sources import source


def test_an_image_folder_dataset_with_train_and_test(tmp_path):
    data_dir = tmp_path / "shapes"
    write_class_folders(data_dir / "train", ["circle", "square", "star"], 4, size=(24, 24))
    write_class_folders(data_dir / "test", ["circle", "square", "star"], 2, size=(24, 24))
    splits = load_source(source(f"hf:{data_dir}", tmp_path / "root", image_size=16))
    assert splits.classes == ("circle", "square", "star")
    assert splits.train.x.shape == (12, 3, 16, 16) and splits.test.x.shape == (6, 3, 16, 16)
    for x, y in zip(splits.train.x, splits.train.y, strict=True):
        assert (x.reshape(3, -1) == np.array(color_of(int(y)))[:, None]).all()


def test_a_text_dataset_without_test_split_is_partitioned_like_any_source(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    texts = [f"{w} report {i}" for i in range(20) for w in ("rain", "goal")]
    labels = [i % 2 for i in range(40)]
    features = Features({"sentence": Value("string"), "topic": ClassLabel(names=["a", "b"])})
    data_dir = tmp_path / "topics"
    data_dir.mkdir()
    Dataset.from_dict({"sentence": texts, "topic": labels}, features=features).to_parquet(
        str(data_dir / "train.parquet"))
    cfg = parse_experiment({
        "data": {"dataset": f"hf:{data_dir}", "root": str(tmp_path / "root"), "max_tokens": 8,
                 "text_buckets": 64, "test_fraction": 0.25},
        "partition": {"scheme": "iid", "num_partitions": 3},
        "model": {"name": "text"},
    })
    spec = dataset_spec(cfg)
    assert spec.classes == ("a", "b") and spec.input_shape == (8,) and spec.vocab_size == 64
    test = held_out_data(cfg)
    clients = [client_data(cfg, i) for i in range(3)]
    assert len(test) == 10 and sum(len(c) for c in clients) == 30
    assert test.class_counts().tolist() == [5, 5]
    row = int(np.flatnonzero(clients[0].y.numpy() == 0)[0])
    words = clients[0].x[row].tolist()
    assert words[0] == token_ids("rain", 64, 1)[0]


def test_a_dataset_that_is_not_there_offline_is_data_missing(tmp_path):
    with pytest.raises(DataMissing, match=r"'hf:no-such-user/no-such-dataset' could not be read"
                                          r".*data\.download=true"):
        load_source(source("hf:no-such-user/no-such-dataset", tmp_path))


def test_a_dataset_without_a_class_label_is_refused(tmp_path):
    from datasets import Dataset

    data_dir = tmp_path / "unlabelled"
    data_dir.mkdir()
    Dataset.from_dict({"sentence": ["a", "b"], "score": [0.1, 0.2]}).to_parquet(
        str(data_dir / "train.parquet"))
    with pytest.raises(ConfigError, match="needs a class-label column"):
        load_source(source(f"hf:{data_dir}", tmp_path))


def test_the_hf_prefix_needs_a_name():
    with pytest.raises(ConfigError, match=r"allowed values are .*hf:<name>"):
        parse_experiment({"data": {"dataset": "hf:"}})
