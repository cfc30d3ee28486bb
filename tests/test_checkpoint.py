import random

import pytest
import torch

from fedhpro_flwr.app.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from fedhpro_flwr.methods.strategy import weighted_average


def saved(tmp_path, strategy="fedhpro", fingerprint="abc"):
    state = {"hyperprototypes": torch.randn(2, 3, 4), "generator": torch.Generator().get_state()}
    checkpoint = Checkpoint.capture(strategy, fingerprint, 3, {"w": torch.ones(2)}, state,
                                    {"rounds": [{"round": 1, "accuracy": 0.5}]})
    save_checkpoint(checkpoint, tmp_path)
    return checkpoint


def test_round_trip(tmp_path):
    original = saved(tmp_path)
    loaded = load_checkpoint(tmp_path, "fedhpro", "abc")
    assert loaded.round == 3 and loaded.results == original.results
    assert torch.equal(loaded.strategy_state["hyperprototypes"],
                       original.strategy_state["hyperprototypes"])
    assert not (tmp_path / "checkpoint.tmp").exists()


@pytest.mark.parametrize(
    ("strategy", "fingerprint", "message"),
    [("fedavg", "abc", "from strategy 'fedhpro'"), ("fedhpro", "xyz", "another experiment config")],
)
def test_mismatched_checkpoint_is_refused(tmp_path, strategy, fingerprint, message):
    saved(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path, strategy, fingerprint)


def test_missing_and_corrupt_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path, "fedhpro", "abc")
    saved(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(tmp_path, "fedhpro", "abc")


def test_a_checkpoint_of_format_1_resumes_without_its_python_random_state(tmp_path):
    """Format 1 also held `random.getstate()`, from when Flower sampled nodes with it."""
    original = saved(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    raw = torch.load(path, weights_only=True)
    raw |= {"format_version": 1, "python_rng": random.getstate()}
    torch.save(raw, path)
    loaded = load_checkpoint(tmp_path, "fedhpro", "abc")
    assert loaded.round == 3 and torch.equal(loaded.torch_rng, original.torch_rng)
    torch.save(raw | {"format_version": 9}, path)
    with pytest.raises(CheckpointError, match="has format 9, expected one of 1, 2"):
        load_checkpoint(tmp_path, "fedhpro", "abc")


def test_weighted_average_keeps_integer_buffers():
    states = [{"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(1)},
              {"w": torch.tensor([3.0, 2.0]), "n": torch.tensor(4)}]
    mean = weighted_average(states, [1.0, 2.0])
    assert torch.allclose(mean["w"], torch.tensor([2.0, 2.0]))
    assert mean["n"].dtype == torch.int64 and mean["n"].item() == 3
