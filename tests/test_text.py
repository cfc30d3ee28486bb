"""AG News from its distributed CSV files, hashed tokens, and a training round on text."""

import csv
import zlib

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.data.federated import client_data, dataset_spec, held_out_data
from fedhpro_flwr.data.sources import DataMissing, load_source
from fedhpro_flwr.data.text import encode, read_label_text_csv, token_ids
from fedhpro_flwr.methods import get_method, parse_experiment
from fedhpro_flwr.methods.base import ClientTask
from tests.test_sources import source

TOPICS = {1: "election minister parliament vote", 2: "match goal league coach",
          3: "shares profit market stocks", 4: "software chip internet research"}


def write_ag_news(root, per_class_train=12, per_class_test=4):
    """ag_news_csv/{train,test}.csv as distributed: every field quoted, class 1-4, title,
    description, line breaks written as a backslash and 'n'."""
    base = root / "ag_news_csv"
    base.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        with open(base / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f, quoting=csv.QUOTE_ALL)
            for i in range(n):
                for label, words in TOPICS.items():
                    writer.writerow([label, f"Story {i}, about {words.split()[0]}",
                                     f"{words}\\nmore: {words}"])


def test_tokens_are_crc32_hashes_padded_with_zero():
    ids = token_ids("Hello, World! it's 2024", buckets=100, max_tokens=6)
    expected = [zlib.crc32(w.encode()) % 99 + 1 for w in ("hello", "world", "it's", "2024")]
    assert ids.tolist() == [*expected, 0, 0]
    assert token_ids("a b c d e f g", 100, 3).tolist() == token_ids("a b c", 100, 3).tolist()
    assert encode([], 100, 4).shape == (0, 4)


def test_agnews_reads_the_csv_layout(tmp_path):
    write_ag_news(tmp_path)
    splits = load_source(source("agnews", tmp_path, max_tokens=16, text_buckets=1000))
    assert splits.is_text and splits.classes == ("World", "Sports", "Business", "Sci/Tech")
    assert splits.train.x.shape == (48, 16) and splits.train.x.dtype == np.int64
    assert splits.train.y[:4].tolist() == [0, 1, 2, 3]  # classes 1-4 become labels 0-3
    assert splits.test is not None and len(splits.test.y) == 16
    first = token_ids('Story 0, about election election minister parliament vote more: '
                      'election minister parliament vote', 1000, 16)
    assert splits.train.x[0].tolist() == first.tolist()  # title + description, "\n" a space


def test_a_bad_csv_row_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('"1","ok","text"\n"World","title","text"\n')
    with pytest.raises(ValueError, match=r"bad\.csv, line 2: the first column must be"):
        read_label_text_csv(path, first_label=1)


def test_missing_agnews_names_the_file(tmp_path):
    with pytest.raises(DataMissing, match=f"not found at {tmp_path / 'ag_news_csv/train.csv'}"):
        load_source(source("agnews", tmp_path))


def agnews_config(root):
    return parse_experiment({
        "data": {"dataset": "agnews", "root": str(root), "text_buckets": 512, "max_tokens": 24},
        "partition": {"num_partitions": 2, "scheme": "iid"},
        "model": {"name": "text", "feature_dim": 16},
        "train": {"local_epochs": 20, "batch_size": 8, "lr": 0.5},
        "fedhpro": {"batch_real": 4, "rounds_of_hp": 3, "recal_features": 4, "recal_epochs": 5},
    })


@pytest.mark.parametrize("name", ["fedavg", "fedhpro"])
def test_a_client_learns_the_topics_with_the_text_model(tmp_path, name):
    cfg = agnews_config(tmp_path)
    write_ag_news(tmp_path)
    spec = dataset_spec(cfg)
    assert spec.input_shape == (24,) and spec.vocab_size == 512
    torch.manual_seed(0)
    model = build_model(cfg.model, spec)
    method = get_method(name)
    strategy = method.make_strategy(cfg, model.state_dict(), spec.num_classes,
                                    model.feature_dim)
    content = RecordDict({**strategy.train_records()})
    data = client_data(cfg, 0)
    _, metrics = method.client_train(ClientTask(model, data, content, cfg, torch.device("cpu"),
                                                torch.Generator().manual_seed(0)))
    assert np.isfinite(metrics["train_loss"])
    test = held_out_data(cfg)
    with torch.no_grad():
        accuracy = (model(test.x).argmax(1) == test.y).float().mean().item()
    assert accuracy == 1.0  # each topic has its own words: a working model separates them
