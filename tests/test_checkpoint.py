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
from fedhpro_flwr.methods import parse_experiment
from fedhpro_flwr.methods.strategy import weighted_average

CFG = parse_experiment({"fedhpro": {"tau": 0.1}})


def saved(tmp_path, strategy="fedhpro", config=CFG, **extra):
    state = {"hyperprototypes": torch.randn(2, 3, 4), "generator": torch.Generator().get_state()}
    results = {"config": config.to_dict(), "num_classes": 10,
               "rounds": [{"round": 1, "accuracy": 0.5}], **extra}
    checkpoint = Checkpoint.capture(strategy, 3, {"w": torch.ones(2)}, state, results)
    save_checkpoint(checkpoint, tmp_path)
    return checkpoint


def test_round_trip(tmp_path):
    original = saved(tmp_path)
    loaded = load_checkpoint(tmp_path, "fedhpro", CFG)
    assert loaded.round == 3 and loaded.results == original.results
    assert torch.equal(loaded.strategy_state["hyperprototypes"],
                       original.strategy_state["hyperprototypes"])
    assert not (tmp_path / "checkpoint.tmp").exists()


def with_keys(**flat):
    return parse_experiment({**CFG.to_dict(), **{k.split(".")[0]: {
        **CFG.to_dict().get(k.split(".")[0], {}), k.split(".")[1]: v} for k, v in flat.items()}})


def test_a_run_resumes_across_what_it_does_not_depend_on(tmp_path):
    saved(tmp_path)
    for later in (with_keys(**{"federation.rounds": 99}), with_keys(**{"fedproto.lam": 5.0}),
                  with_keys(**{"federation.server_threads": 2}),
                  with_keys(**{"fedhpro.hp_softmax_classes": 12})):  # 10 classes: idle
        assert load_checkpoint(tmp_path, "fedhpro", later).round == 3
    saved(tmp_path, "fedavg")
    assert load_checkpoint(tmp_path, "fedavg", with_keys(**{"fedhpro.tau": 0.3})).round == 3


@pytest.mark.parametrize(
    ("strategy", "config", "message"),
    [("fedavg", CFG, "from strategy 'fedhpro'"),
     ("fedhpro", with_keys(**{"fedhpro.tau": 0.3}), r"fedhpro.tau 0.1 -> 0.3"),
     ("fedhpro", with_keys(**{"train.lr": 0.5}), r"train.lr 0.05 -> 0.5"),
     ("fedhpro", with_keys(**{"fedhpro.hp_softmax_classes": 4}), "hp_softmax_classes 0 -> 4")],
)
def test_mismatched_checkpoint_is_refused(tmp_path, strategy, config, message):
    saved(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path, strategy, config)


def test_personal_models_resume_only_where_the_clients_saved_them(tmp_path):
    """Before clients saved their models (no experiment id in the results), resuming would
    have restarted them."""
    hetero = with_keys(**{"model.backbones": "cnn-8,cnn-16"})
    saved(tmp_path, config=hetero)
    with pytest.raises(CheckpointError, match="before its clients saved their personal models"):
        load_checkpoint(tmp_path, "fedhpro", hetero)
    saved(tmp_path, config=hetero, experiment_id="abc")
    assert load_checkpoint(tmp_path, "fedhpro", hetero).results["experiment_id"] == "abc"


def test_a_key_the_code_gained_since_counts_at_the_value_it_was_added_with(tmp_path):
    original = saved(tmp_path)
    recorded = original.results["config"]
    del recorded["fedhpro"]["recal_source"]  # a run from before the key existed: the paper's
    save_checkpoint(original, tmp_path)
    with pytest.raises(CheckpointError, match="recal_source 'gradients' -> 'moments'"):
        load_checkpoint(tmp_path, "fedhpro", CFG)
    paper = with_keys(**{"fedhpro.recal_source": "gradients"})
    assert load_checkpoint(tmp_path, "fedhpro", paper).round == 3


def test_missing_and_corrupt_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path, "fedhpro", CFG)
    saved(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(tmp_path, "fedhpro", CFG)


def test_checkpoints_of_formats_1_and_2_resume(tmp_path):
    """Format 1 also held `random.getstate()`, from when Flower sampled nodes with it; both
    held a hash of the config, which the recorded config replaces."""
    original = saved(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    raw = torch.load(path, weights_only=True)
    for old in ({"format_version": 1, "python_rng": random.getstate(), "fingerprint": "abc"},
                {"format_version": 2, "fingerprint": "abc"}):
        torch.save(raw | old, path)
        loaded = load_checkpoint(tmp_path, "fedhpro", CFG)
        assert loaded.round == 3 and torch.equal(loaded.torch_rng, original.torch_rng)
    torch.save(raw | {"format_version": 9}, path)
    with pytest.raises(CheckpointError, match="has format 9, expected one of 1, 2, 3"):
        load_checkpoint(tmp_path, "fedhpro", CFG)
    torch.save(raw | {"results": {"rounds": []}}, path)
    with pytest.raises(CheckpointError, match="no record of its experiment config"):
        load_checkpoint(tmp_path, "fedhpro", CFG)


def test_weighted_average_keeps_integer_buffers():
    states = [{"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(1)},
              {"w": torch.tensor([3.0, 2.0]), "n": torch.tensor(4)}]
    mean = weighted_average(states, [1.0, 2.0])
    assert torch.allclose(mean["w"], torch.tensor([2.0, 2.0]))
    assert mean["n"].dtype == torch.int64 and mean["n"].item() == 3
