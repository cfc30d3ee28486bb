"""A SuperNode's own data (`data-dir` in its node config), read whole and shaped like the
federation's, through the real ClientApp handler; and the data spec the server sends."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.serde import config_record_from_proto, config_record_to_proto

from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.app.client import handle_train, node_partition
from fedhpro_flwr.config import ConfigError, DataConfig, ExperimentConfig
from fedhpro_flwr.data.federated import DataSpec, dataset_spec, local_data
from fedhpro_flwr.methods import get_method
from fedhpro_flwr.methods.payload import tensors_to_record
from tests.images import write_image
from tests.test_method_round import CFG, training_message
from tests.test_text import write_ag_news

pytestmark = pytest.mark.usefixtures("serverapp_identity")

SPEC = DataSpec((3, 8, 8), ("cat", "dog", "owl"), (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))


def test_the_spec_survives_a_config_record_on_the_wire():
    for spec in (SPEC, DataSpec((24,), ("a", "b"), vocab_size=512)):  # text: empty lists
        wire = config_record_to_proto(ConfigRecord(spec.to_config()))
        assert DataSpec.from_config(config_record_from_proto(wire)) == spec


def test_a_message_without_a_spec_is_a_clear_error():
    with pytest.raises(ConfigError, match="lacks a valid data spec"):
        DataSpec.from_config({"data.dataset": "mnist-subset"})


def test_an_image_folder_is_resized_and_standardised_like_the_federation(tmp_path):
    write_image(tmp_path / "owl" / "a.png", (255, 0, 51), (20, 10))
    write_image(tmp_path / "owl" / "b.jpg", (255, 0, 51), (5, 5))
    write_image(tmp_path / "cat" / "c.png", (0, 255, 255), (9, 9))
    data = local_data(SPEC, DataConfig(), tmp_path)
    assert data.x.shape == (3, 3, 8, 8) and data.y.tolist() == [0, 2, 2]
    expected = (np.array([0, 255, 255]) / 255 - np.array(SPEC.mean)) / np.array(SPEC.std)
    assert torch.allclose(data.x[0].mean(dim=(1, 2)), torch.tensor(expected).float(), atol=1e-5)


def unknown_class(root):
    write_image(root / "horse" / "a.png", (1, 2, 3))
    return root


def empty_folder(root):
    (root / "empty").mkdir()
    return root / "empty"


def a_file(root):
    return write_image(root / "file.png", (1, 2, 3))


@pytest.mark.parametrize(("make", "message"), [
    (unknown_class, "'horse' is not a class"), (empty_folder, "no samples found"),
    (a_file, "must be a folder"),
])
def test_bad_image_folders_are_refused(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message):
        local_data(SPEC, DataConfig(), make(tmp_path))


def test_a_missing_data_dir_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"'data-dir' = '{tmp_path / 'nope'}': no such"):
        local_data(SPEC, DataConfig(), tmp_path / "nope")


def test_a_text_node_reads_its_csv_and_rejects_unknown_classes(tmp_path):
    write_ag_news(tmp_path, per_class_train=3, per_class_test=1)
    spec = DataSpec((16,), ("World", "Sports", "Business", "Sci/Tech"), vocab_size=256)
    data = local_data(spec, DataConfig(), tmp_path / "ag_news_csv" / "train.csv")
    assert data.x.shape == (12, 16) and data.y.tolist() == [0, 1, 2, 3] * 3
    bad = tmp_path / "five.csv"
    bad.write_text('"5","title","text"\n')
    with pytest.raises(ConfigError, match=r"class number 5 is outside 1\.\.4"):
        local_data(spec, DataConfig(), bad)
    with pytest.raises(ConfigError, match="must be a CSV file"):
        local_data(spec, DataConfig(), tmp_path)


def test_a_node_with_its_own_digits_trains_in_a_fedhpro_round(tmp_path):
    """The federation trains on the MNIST subset; this node holds 30 PNG digits of its own,
    of another size and in colour, and never reads the federation's dataset."""
    for digit in (1, 4, 7):
        for i in range(10):
            write_image(tmp_path / str(digit) / f"{i}.png", (40 * i, 20 * digit, 90), (32, 32))
    spec = dataset_spec(CFG)
    torch.manual_seed(0)
    model = build_model(CFG.model, spec)
    strategy = get_method("fedhpro").make_strategy(CFG, model.state_dict(), spec.num_classes,
                                                   model.feature_dim)
    arrays = tensors_to_record(model.state_dict())
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 42,
                                                        "data-dir": str(tmp_path)},
                      state=RecordDict(), run_config={})
    reply = handle_train(training_message("fedhpro", strategy, arrays, 7), context)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 30 and metrics["partition-id"] == 42
    weights, _ = strategy.aggregate_train(1, [reply])
    assert weights is not None and strategy.report.participants == [42]


def test_a_node_with_data_dir_still_needs_an_id(tmp_path):
    num_partitions = ExperimentConfig().partition.num_partitions
    with pytest.raises(ConfigError, match="still needs an integer 'partition-id'"):
        node_partition({"data-dir": str(tmp_path)}, num_partitions)
    assert node_partition({"data-dir": str(tmp_path), "partition-id": 3}, num_partitions) == 3
