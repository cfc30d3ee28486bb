import dataclasses
import re
from pathlib import Path

import pytest

from fedhpro_flwr.config import (
    FIRST_DEFAULTS,
    ConfigError,
    ExperimentConfig,
    parse_overrides,
    resolve_run_config,
)
from fedhpro_flwr.methods import SECTIONS, load_experiment, parse_experiment
from fedhpro_flwr.methods.fedhpro import FedHProConfig

ROOT = Path(__file__).resolve().parents[1]


def resolve(**run_config):
    return resolve_run_config(run_config, ROOT, SECTIONS)


def test_default_yaml_loads_and_round_trips_through_flat_form():
    cfg = load_experiment(ROOT / "conf" / "default.yaml")
    assert cfg.partition.num_partitions == 10 and cfg.partition.alpha == 0.5
    assert ExperimentConfig.from_flat(cfg.to_flat(), SECTIONS) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fedhpro.taus": 0.1}, "unknown config key 'fedhpro.taus'"),
        ({"nosuch": 1}, "unknown config key 'nosuch'"),
        ({"train.local_epochs": "two"}, "'train.local_epochs' = 'two': expected an integer"),
        ({"train.local_epochs": 1.5}, "expected an integer"),
        ({"fedhpro.margin": 1}, "expected true or false"),
        ({"fedhpro.tau": 0}, "'fedhpro.tau' = 0: must be > 0.0"),
        ({"partition.num_partitions": 0}, "must be >= 1"),
        ({"federation.fraction_train": 1.5}, "must be <= 1"),
        ({"fedhpro.distance": "l1"}, "allowed values are cosine, mse"),
        ({"model.name": "vgg"}, "allowed values are cnn, resnet10"),
        ({"fedhpro.lr_hp": float("nan")}, "finite"),
        ({"fedhpro.recal_source": "means"}, "allowed values are gradients, moments"),
        ({"fedhpro.recal_solver": "lbfgs"}, "allowed values are sgd, full-batch"),
        ({"fedhpro.recal_classes_per_step": 1},
         "'fedhpro.recal_classes_per_step' = 1: a softmax needs at least 2 classes"),
        ({"fedhpro.distance": "scalar"}, "allowed values are cosine, mse"),
        ({"fedhpro.recal_to_clients": False},
         "config key 'fedhpro.recal_to_clients' was closed by the experiments that tested it: "
         "FedHPro now always runs as with true"),
        ({"fedhpro.hp_target": "row-grads"},
         "FedHPro now always runs as with 'feature-grads'"),
        ({"fedhpro.hp_softmax_classes": 1},
         "'fedhpro.hp_softmax_classes' = 1: a softmax needs at least 2 classes"),
    ],
)
def test_bad_values_name_key_value_and_rule(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_experiment(ROOT / "conf" / "default.yaml", overrides)


def test_run_config_overrides_yaml():
    s = resolve(**{"num-server-rounds": 3, "seed": 7, "out-dir": "/tmp/x",
                   "overrides": "train.local_epochs=2 fedhpro.recalibration=false"})
    e = s.experiment
    assert (e.federation.rounds, e.seed, e.train.local_epochs) == (3, 7, 2)
    assert e.section(FedHProConfig).recalibration is False and s.out_dir == Path("/tmp/x")


def test_run_config_defaults_come_from_the_yaml():
    s = resolve()
    assert s.strategy == "fedhpro" and s.experiment.federation.rounds == 20
    assert s.out_dir.name == "default-fedhpro-seed536" and s.resume is False


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ({"strategy": "fedfoo"}, "'strategy' = 'fedfoo': available strategies are fedhpro"),
        ({"out-dir": "rel/dir"}, "must be an absolute path"),
        ({"num-server-rounds": -1}, "'num-server-rounds' = -1"),
        ({"num-server-rounds": "3"}, "expected an integer"),
        ({"config": "conf/missing.yaml"}, "no such file"),
        ({"overrides": "train.lr"}, "not of the form key=value"),
        ({"num-server-round": 3}, "unknown run-config key 'num-server-round'"),
    ],
)
def test_bad_run_config(run_config, message):
    with pytest.raises(ConfigError, match=message):
        resolve(**run_config)


def test_parse_overrides_reads_yaml_scalars():
    assert parse_overrides("a.b=1 c=0.5 d=true e=cosine") == {
        "a.b": 1, "c": 0.5, "d": True, "e": "cosine"}


def test_a_number_in_e_notation_is_a_number_in_a_file_and_an_override(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string; a float key takes it as the number."""
    assert parse_overrides("train.lr=1e-3")["train.lr"] == "1e-3"
    cfg = load_experiment(ROOT / "conf" / "default.yaml", parse_overrides(
        "train.lr=1e-3 fedhpro.lr_hp=2E+1 train.weight_decay=.5e-4"))
    assert (cfg.train.lr, cfg.section(FedHProConfig).lr_hp, cfg.train.weight_decay) == (
        1e-3, 20.0, 5e-5)
    (tmp_path / "e.yaml").write_text("train:\n  lr: 1e-2\n")
    assert load_experiment(tmp_path / "e.yaml").train.lr == 0.01
    with pytest.raises(ConfigError, match=r"'train\.lr' = '1e-3x': expected a number"):
        load_experiment(ROOT / "conf" / "default.yaml", {"train.lr": "1e-3x"})


def test_setup_changes_leave_out_rounds_where_it_computes_and_other_methods():
    cfg = parse_experiment({})
    recorded = cfg.to_dict()

    def changed(flat, method="fedhpro"):
        later = ExperimentConfig.from_flat({**cfg.to_flat(), **flat}, SECTIONS)
        return later.setup_changes(recorded, method)

    assert changed({"federation.rounds": 99, "federation.server_threads": 2}) == {}
    assert changed({"fedhpro.tau": 0.2}) == {"fedhpro.tau": (0.05, 0.2)}
    assert changed({"fedhpro.tau": 0.2}, "fedavg") == {}  # FedAvg never reads it
    assert changed({"seed": 1}, "fedavg") == {"seed": (536, 1)}


def test_a_key_added_since_counts_at_the_behaviour_before_it():
    # a run recorded before the code gained a key was made with the key's first value
    @dataclasses.dataclass(frozen=True)
    class Grown(FedHProConfig):
        new_knob: int = 3

    cfg = parse_experiment({"fedhpro": {"tau": 0.1}})
    recorded = cfg.to_dict()

    def grown(**knob):
        return dataclasses.replace(cfg, methods={**cfg.methods, "fedhpro": Grown(tau=0.1, **knob)})

    assert grown().setup_changes(recorded, "fedhpro") == {}
    assert grown(new_knob=4).setup_changes(recorded, "fedhpro") == {"fedhpro.new_knob": (3, 4)}
    # a key whose default changed counts at the value it was added with
    del recorded["fedhpro"]["recal_source"]
    source = FIRST_DEFAULTS["fedhpro.recal_source"]
    assert cfg.setup_changes(recorded, "fedhpro") == {
        "fedhpro.recal_source": (source, "moments")}


def test_a_closed_key_counts_only_away_from_the_behaviour_kept():
    # a run recorded while an experiment's key existed is the same run at the value kept,
    # and not the same at any other (the code that made it is gone)
    cfg = parse_experiment({})
    recorded = cfg.to_dict()
    recorded["fedhpro"] |= {"recal_to_clients": True, "hp_target": "feature-grads"}
    assert cfg.setup_changes(recorded, "fedhpro") == {}
    recorded["fedhpro"]["recal_to_clients"] = False
    assert cfg.setup_changes(recorded, "fedhpro") == {"fedhpro.recal_to_clients": (False, True)}
    assert cfg.setup_changes(recorded, "fedavg") == {}  # FedAvg never read it
