"""One typed, validated experiment configuration.

An experiment is a YAML file (see ``conf/``); Flower's run config picks the file and may
override any of its keys. Everything is checked once, at start, and every error names the
key, the value and what is allowed. The resolved config travels to clients as a flat
``{"section.key": scalar}`` mapping, so both sides run from the same values.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

Scalar = bool | int | float | str
T = TypeVar("T")
STRATEGY_KEY = "strategy"  # names the method in the ConfigRecord sent to clients
# names the experiment (one call of the ServerApp's run) in the same ConfigRecord: several
# experiments can share one Flower run, and with it the nodes' context state
EXPERIMENT_ID_KEY = "experiment-id"
DATASETS = ("mnist-subset", "uci-digits", "digits-offline", "mnist", "fashion-mnist", "usps",
            "svhn", "syn", "digits", "cifar10", "cifar100", "office-caltech", "tiny-imagenet",
            "sun397", "agnews", "glyphs-100", "glyphs-400")  # sources.py's; plus "hf:<name>"
HF_PREFIX = "hf:"  # a Hugging Face dataset, read through flwr-datasets


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def setting(
    default: Any,
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    prefixes: tuple[str, ...] = (),
) -> Any:
    """A dataclass field with the constraints `_check_value` enforces; a string starting with
    one of `prefixes` is allowed beside the `choices`."""
    return field(default=default, metadata={"choices": choices, "ge": ge, "gt": gt, "le": le,
                                            "prefixes": prefixes})


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and how much of it is held out for server-side evaluation."""

    dataset: str = setting("mnist-subset", choices=DATASETS, prefixes=(HF_PREFIX,))
    test_fraction: float = setting(0.2, gt=0.0, le=0.9)  # held out when there is no test split
    # share of the training pool held out (stratified, seeded) to score hyper-parameters on,
    # never the test set; 0 = none. Clients train on the rest; the server (personal models:
    # each client, from its own data) reports val_accuracy beside the test accuracy.
    validation_fraction: float = setting(0.0, ge=0.0, le=0.5)
    root: str = setting("~/fedhpro-data")  # where downloadable datasets live
    download: bool = setting(False)  # fetch a missing dataset (needs internet)
    image_size: int = setting(0, ge=0)  # resize images to this square; 0 = the source's size
    text_buckets: int = setting(32768, ge=2)  # text: words are hashed into this many ids
    max_tokens: int = setting(64, ge=1)  # text: tokens kept per sample
    # glyphs-*: training images generated per class (a fifth as many for test); 0 = the
    # dataset's own (500 for glyphs-100, 120 for glyphs-400). Smaller sets for quick tests.
    samples_per_class: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        if self.samples_per_class and (not self.dataset.startswith("glyphs-")
                                       or self.samples_per_class < 5):
            raise ConfigError(
                f"config key 'data.samples_per_class' = {self.samples_per_class}: only the "
                f"generated glyphs-* datasets take it, and then 5 or more (one in five is a "
                f"test image); dataset is '{self.dataset}'; 0 keeps the dataset's own size"
            )


@dataclass(frozen=True)
class PartitionConfig:
    """How the training data is split across clients."""

    scheme: str = setting("dirichlet",
                        choices=("dirichlet", "iid", "long-tail", "k-classes", "domains"))
    num_partitions: int = setting(10, ge=1)
    alpha: float = setting(0.5, gt=0.0)  # dirichlet, long-tail, domains
    min_size: int = setting(10, ge=1)  # dirichlet, long-tail, domains
    domain_fraction: float = setting(1.0, gt=0.0, le=1.0)  # domains: share of each domain used
    client_fraction: float = setting(0.0, ge=0.0, le=1.0)  # domains: share of its domain each
    # client holds (FPL's `percent`); 0 = the domain_fraction split among the domain's clients
    clients_per_domain: str = setting("")  # domains: e.g. "3 7 6 4"; "" = dealt round-robin
    # heterogeneous clients (model.backbones): each client's share held out to evaluate its
    # own model on
    local_test_fraction: float = setting(0.2, gt=0.0, le=0.9)

    def __post_init__(self) -> None:
        self.domain_clients()  # check the format once, at start

    def domain_clients(self) -> tuple[int, ...]:
        """`clients_per_domain` as numbers; () when the clients are dealt round-robin."""
        try:
            counts = tuple(int(n) for n in self.clients_per_domain.split())
        except ValueError:
            counts = (0,)
        if any(n < 1 for n in counts) or (counts and sum(counts) != self.num_partitions):
            raise ConfigError(
                f"config key 'partition.clients_per_domain' = {self.clients_per_domain!r}: "
                f"expected positive whole numbers, one per domain, adding up to "
                f"partition.num_partitions = {self.num_partitions}"
            )
        return counts
    imbalance_factor: float = setting(100.0, ge=1.0)  # long-tail: largest / smallest class
    classes_per_client: int = setting(2, ge=1)  # k-classes


@dataclass(frozen=True)
class ModelConfig:
    """The backbone: a feature extractor ``features(x) -> z`` plus a linear ``classifier``."""

    name: str = setting("cnn", choices=("cnn", "resnet10", "text"))
    feature_dim: int = setting(128, ge=2)  # d of the CNN and text model; ResNet-10's: 8 * width
    width: int = setting(32, ge=1)  # ResNet-10 base filters
    # heterogeneous clients: backbones dealt to the partitions in turn, e.g.
    # "cnn-8,cnn-16,resnet10-8" (name-width), all projecting to feature_dim; "" = every
    # client runs `name` and the whole model is averaged
    backbones: str = setting("")
    # the extractor's initial weights: PyTorch's layer defaults, or He's normal for ReLU
    # layers (`models.kaiming_init`), which the glyph sets' many-class configs need to leave
    # chance within a CPU budget
    init: str = setting("pytorch", choices=("pytorch", "kaiming"))

    def __post_init__(self) -> None:
        self.backbone_list()  # check the format once, at start

    def backbone_list(self) -> tuple[tuple[str, int], ...]:
        """`backbones` as (name, width) pairs; () when the clients are homogeneous."""
        found = []
        for entry in filter(None, (e.strip() for e in self.backbones.split(","))):
            name, _, width = entry.partition("-")
            if name not in ("cnn", "resnet10") or not width.isdigit() or int(width) < 1:
                raise ConfigError(
                    f"config key 'model.backbones' = {self.backbones!r}: entry {entry!r} is not "
                    f"cnn-W or resnet10-W (W: base filters, a positive whole number)")
            found.append((name, int(width)))
        if found and self.name == "text":
            raise ConfigError("config key 'model.backbones' is for image data; "
                              "model.name = 'text' has one backbone")
        return tuple(found)


@dataclass(frozen=True)
class TrainConfig:
    """Local training on every client, shared by all methods."""

    local_epochs: int = setting(5, ge=1)
    batch_size: int = setting(64, ge=1)
    lr: float = setting(0.05, gt=0.0)
    momentum: float = setting(0.0, ge=0.0, le=1.0)
    weight_decay: float = setting(0.0, ge=0.0)
    num_threads: int = setting(1, ge=0)  # torch threads per client; 0 = torch's default


@dataclass(frozen=True)
class FederationConfig:
    """Rounds and client sampling."""

    rounds: int = setting(20, ge=1)
    fraction_train: float = setting(1.0, gt=0.0, le=1.0)
    min_train_nodes: int = setting(2, ge=1)  # wait for this many connected nodes, sample >= it
    min_replies: int = setting(1, ge=1)  # fewer usable replies in a round stop the run
    round_timeout: float = setting(3600.0, gt=0.0)  # seconds to wait for replies
    server_threads: int = setting(1, ge=0)  # torch threads of the ServerApp; 0 = torch's default
    # how the server pools the clients' uploads: "mean" (each method's own average), or the
    # coordinate-wise "median" / "trimmed-mean" of the weights and the class statistics, one
    # vote a client (algorithms/robust.py)
    aggregation: str = setting("mean", choices=("mean", "median", "trimmed-mean"))
    trim_fraction: float = setting(0.1, ge=0.0, le=0.49)  # trimmed-mean: share cut at each end


@dataclass(frozen=True)
class PrivacyConfig:
    """Record-level differential privacy of everything a client sends (algorithms/privacy.py):
    DP-SGD for the weights, Gaussian noise on each class statistic and count. Off at 0."""

    # DP-SGD's noise, a multiple of `max_grad_norm`; > 0 turns privacy on for the whole upload
    noise_multiplier: float = setting(0.0, ge=0.0)
    max_grad_norm: float = setting(1.0, gt=0.0)  # each record's gradient is clipped to this
    # the class statistics' noise, a multiple of their bound; 0 = `noise_multiplier`
    stats_noise_multiplier: float = setting(0.0, ge=0.0)
    stats_clip: float = setting(1.0, gt=0.0)  # each part of a record's statistic: at most this
    delta: float = setting(1e-5, gt=0.0, le=0.1)  # the (epsilon, delta) guarantee's delta

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0.0

    @property
    def stats_noise(self) -> float:
        return self.stats_noise_multiplier or self.noise_multiplier


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Measurements that cost extra work; what comes free is always in results.json."""

    # clients report the mean cosine between their class prototypes after training and the
    # global anchors they received (prototype methods, FedHPro: one more pass over the data)
    consistency: bool = setting(False)
    embedding_rounds: str = setting("")  # e.g. "1,10": save a 2-D PCA of test features + anchors
    embedding_samples: int = setting(50, ge=1)  # test samples per class in that picture

    def __post_init__(self) -> None:
        self.rounds()

    def rounds(self) -> tuple[int, ...]:
        """`embedding_rounds` as numbers."""
        try:
            rounds = tuple(int(n) for n in self.embedding_rounds.replace(",", " ").split())
        except ValueError:
            rounds = (0,)
        if any(n < 1 for n in rounds):
            raise ConfigError(f"config key 'diagnostics.embedding_rounds' = "
                              f"{self.embedding_rounds!r}: expected round numbers >= 1, "
                              f"separated by commas")
        return rounds


# keys that cap how many classes one server step involves (0: no cap); a cap at or above the
# dataset's classes leaves every step as it is without one
CLASS_CAPS = frozenset({"fedhpro.recal_classes_per_step", "fedhpro.hp_softmax_classes"})


def without_idle_caps(flat: Mapping[str, Scalar], num_classes: int) -> dict[str, Scalar]:
    """`flat` with each class cap that `num_classes` classes do not reach written as 0: the
    same run, spelled one way."""
    return {key: 0 if key in CLASS_CAPS and int(value) >= num_classes else value
            for key, value in flat.items()}


# keys that say where or for how long a run computes, not what: a run may change them and
# still be the same run (resume, benchmark results read back)
NOT_SETUP = frozenset({"federation.rounds", "federation.server_threads"})


# keys whose default has changed since they were added, at the default they were added with:
# a run recorded (or checkpointed) before the key existed was made with that value
FIRST_DEFAULTS: dict[str, Scalar] = {"fedhpro.recal_source": "gradients",
                                     "fedhpro.recal_solver": "sgd",
                                     "fedhpro.recal_classes_per_step": 0,
                                     "fedhpro.hp_softmax_classes": 0}


# keys that experiments closed (the project's findings), at the one behaviour that stays: a run
# recorded (or checkpointed) with another value was made by code this version no longer has
CLOSED: dict[str, Scalar] = {"fedhpro.init": "normal",
                             "fedhpro.hp_step": "sgd",
                             "fedhpro.hp_separate": False,
                             "fedhpro.hp_target": "feature-grads",
                             "fedhpro.recal_after_training": False,
                             "fedhpro.recal_recentre": False,
                             "fedhpro.recal_to_clients": True}


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: the YAML file's content after overrides."""

    seed: int = setting(536, ge=0)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # each method's own section (its YAML section of the same name), by method name; a
    # method without one here takes its section's defaults (see `section`)
    methods: Mapping[str, Any] = field(default_factory=dict, hash=False,
                                       metadata={"sections": True})

    def __post_init__(self) -> None:
        if not self.privacy.enabled:
            return
        backbones = {self.model.name, *(name for name, _ in self.model.backbone_list())}
        if "resnet10" in backbones:
            raise ConfigError("privacy.noise_multiplier > 0 needs a model without BatchNorm, "
                              "whose per-sample gradients mix the batch: model 'cnn' or 'text', "
                              "not 'resnet10'")
        if self.diagnostics.consistency:
            raise ConfigError("diagnostics.consistency reports a statistic of the training "
                              "records outside the privacy accounting; turn one of them off")

    def section(self, kind: type[T]) -> T:
        """The method section of type `kind`: as configured, else its defaults."""
        found = [value for value in self.methods.values() if isinstance(value, kind)]
        return found[0] if found else kind()

    def only(self, method: str) -> ExperimentConfig:
        """This experiment with no method section but `method`'s: what its clients need."""
        return dataclasses.replace(
            self, methods={k: v for k, v in self.methods.items() if k == method})

    def to_dict(self) -> dict[str, Any]:
        """The nested mapping a YAML file holds (method sections at the top level)."""
        nested = {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                  if not f.metadata.get("sections")}
        return nested | {name: _plain(value) for name, value in self.methods.items()}

    def to_flat(self) -> dict[str, Scalar]:
        """``{"section.key": value}``: what a Flower ConfigRecord can carry."""
        return flatten(self.to_dict())

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any],
                  sections: Mapping[str, type | None] | None = None) -> ExperimentConfig:
        """Inverse of `to_flat`; validates like `from_dict`."""
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            _set_dotted(nested, key, value)
        return cls.from_dict(nested, sections)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any],
                  sections: Mapping[str, type | None] | None = None) -> ExperimentConfig:
        """Build and validate from a nested mapping (a parsed YAML file). `sections`: the
        methods whose sections it may hold, each with its section's type (None: the method
        has no section; the registry's `SECTIONS`); one absent from `raw` takes its defaults."""
        sections = {name: kind for name, kind in (sections or {}).items() if kind is not None}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"the config file must be a mapping of keys to values, got {raw!r}")
        common = {f.name for f in fields(cls) if not f.metadata.get("sections")}
        unknown = sorted(set(raw) - common - set(sections))
        if unknown:
            raise ConfigError(f"unknown config key '{unknown[0]}'; allowed keys: "
                              f"{', '.join(sorted(common | set(sections)))}")
        base = _build(cls, {k: v for k, v in raw.items() if k in common}, prefix="")
        methods = {name: _build(kind, raw.get(name, {}), prefix=name + ".")
                   for name, kind in sections.items()}
        return dataclasses.replace(base, methods=methods)

    def first_defaults(self) -> dict[str, Scalar]:
        """Every key of this config (its method sections' too) at the value it was added
        with: the behaviour of a run recorded before the key existed."""
        defaults = dataclasses.replace(
            type(self)(), methods={name: type(value)() for name, value in self.methods.items()})
        return defaults.to_flat() | FIRST_DEFAULTS

    def setup_changes(self, recorded: Mapping[str, Any], method: str,
                      num_classes: int | None = None) -> dict[str, tuple[Any, Any]]:
        """How a run of `method` under this config differs from one made under `recorded` (a
        results.json's nested "config"): ``{key: (then, now)}`` over the keys that reach such a
        run, the common ones and its own method's section, less `NOT_SETUP`. A key `recorded`
        lacks counts at the value it was added with (the run predates it), one it holds that
        has since been closed (`CLOSED`) at any other value than the one kept; given the
        dataset's `num_classes`, a class cap that the classes do not reach counts as no cap."""
        first = self.first_defaults()
        now = {k: v for k, v in self.only(method).to_flat().items() if k not in NOT_SETUP}
        before = flatten(recorded)
        then = {k: before.get(k, first.get(k)) for k in now}
        if num_classes is not None:
            now, then = (without_idle_caps(flat, num_classes) for flat in (now, then))
        closed = {k: (before[k], kept) for k, kept in CLOSED.items()
                  if k.startswith(f"{method}.") and k in before and before[k] != kept}
        return {k: (then[k], now[k]) for k in now if then[k] != now[k]} | closed


def flatten(nested: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config mapping (`ExperimentConfig.to_dict`, a results.json's "config") as
    ``{"section.key": value}``."""
    flat: dict[str, Any] = {}
    for name, value in nested.items():
        if isinstance(value, dict):
            flat |= {f"{name}.{key}": sub for key, sub in value.items()}
        else:
            flat[name] = value
    return flat


def _plain(value: Any) -> Any:
    """A config section as a plain dict (a scalar as it is)."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        node = target.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{part}' is a value, not a section")
        target = node
    target[leaf] = value


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the config file"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {raw!r}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("sections")}
    unknown = sorted(set(raw) - set(known))
    closed = [prefix + name for name in unknown if prefix + name in CLOSED]
    if closed:
        kept = CLOSED[closed[0]]
        shown = str(kept).lower() if isinstance(kept, bool) else repr(kept)
        raise ConfigError(
            f"config key '{closed[0]}' was closed by the experiments that tested it: FedHPro "
            f"now always runs as with {shown} (the project's findings say why)")
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys"
            f"{' in ' + repr(prefix.rstrip('.')) if prefix else ''}: {', '.join(sorted(known))}"
        )
    values = {}
    for name, f in known.items():
        if name not in raw:
            continue
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], raw[name], prefix=key + ".")
        else:
            values[name] = _check_value(key, raw[name], hints[name], f.metadata)
    return cls(**values)


SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _check_value(key: str, value: Any, kind: Any, spec: Mapping[str, Any]) -> Scalar:
    shown = f"config key '{key}' = {value!r}"
    if get_origin(kind) is Literal:  # the allowed values are the type's own
        spec = {**spec, "choices": get_args(kind)}
        kind = str
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{shown}: expected true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{shown}: expected an integer")
    elif kind is float:
        if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot, no sign) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{shown}: expected a number")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{shown}: expected a finite number")
    elif kind is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a lone number where a list of numbers is read from a string
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"{shown}: expected a string")
    open_ended = any(str(value).startswith(p) and len(str(value)) > len(p)
                     for p in spec.get("prefixes", ()))
    if spec.get("choices") and value not in spec["choices"] and not open_ended:
        allowed = [*spec["choices"], *(f"{p}<name>" for p in spec.get("prefixes", ()))]
        raise ConfigError(f"{shown}: allowed values are {', '.join(allowed)}")
    if spec.get("ge") is not None and value < spec["ge"]:
        raise ConfigError(f"{shown}: must be >= {spec['ge']}")
    if spec.get("gt") is not None and value <= spec["gt"]:
        raise ConfigError(f"{shown}: must be > {spec['gt']}")
    if spec.get("le") is not None and value > spec["le"]:
        raise ConfigError(f"{shown}: must be <= {spec['le']}")
    return value


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"a.b=1 c.d=true"`` into ``{"a.b": 1, "c.d": True}`` (values read as YAML)."""
    overrides: dict[str, Any] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"run-config key 'overrides': '{item}' is not of the form key=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def read_experiment(path: Path, overrides: Mapping[str, Any] | None = None,
                    sections: Mapping[str, type | None] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file, apply dotted-key overrides, validate (with the method
    `sections` it may hold: see `ExperimentConfig.from_dict`)."""
    if not path.is_file():
        raise ConfigError(f"run-config key 'config' = '{path}': no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return ExperimentConfig.from_dict(raw, sections)


@dataclass(frozen=True)
class RunSettings:
    """What one Flower run does: a method, an experiment, where results go."""

    strategy: str
    experiment: ExperimentConfig
    out_dir: Path
    resume: bool
    config_path: Path


RUN_CONFIG_KEYS = ("strategy", "config", "num-server-rounds", "seed", "out-dir", "resume",
                   "overrides")


def resolve_run_config(
    run_config: Mapping[str, Any], app_dir: Path, sections: Mapping[str, type | None]
) -> RunSettings:
    """Turn Flower's run config into `RunSettings`; missing keys take pyproject's defaults.
    `sections`: the registered methods, by name, with their config sections."""
    strategies = tuple(sections)
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown run-config key '{unknown[0]}'; allowed: {', '.join(RUN_CONFIG_KEYS)}"
        )

    def get(key: str, default: Any, kind: type) -> Any:
        value = run_config.get(key, default)
        return _check_value(f"run-config {key}", value, kind, {})

    strategy = get("strategy", "fedhpro", str)
    if strategy not in strategies:
        raise ConfigError(
            f"run-config key 'strategy' = '{strategy}': available strategies are "
            f"{', '.join(strategies)}"
        )
    overrides = parse_overrides(get("overrides", "", str))
    rounds = get("num-server-rounds", 0, int)
    if rounds < 0:
        raise ConfigError(f"run-config key 'num-server-rounds' = {rounds}: must be >= 0 "
                          "(0 = the YAML's federation.rounds)")
    if rounds:
        overrides["federation.rounds"] = rounds
    seed = get("seed", -1, int)
    if seed < -1:
        raise ConfigError(f"run-config key 'seed' = {seed}: must be >= 0 (-1 = the YAML's seed)")
    if seed >= 0:
        overrides["seed"] = seed

    config_path = Path(get("config", "conf/default.yaml", str)).expanduser()
    if not config_path.is_absolute():
        config_path = app_dir / config_path
    experiment = read_experiment(config_path, overrides, sections)

    out_text = get("out-dir", "", str)
    if out_text:
        out_dir = Path(out_text).expanduser()
        if not out_dir.is_absolute():
            raise ConfigError(
                f"run-config key 'out-dir' = '{out_text}': must be an absolute path, because "
                "the ServerApp runs in the SuperLink's working directory"
            )
    else:
        run_name = f"{config_path.stem}-{strategy}-seed{experiment.seed}"
        out_dir = Path.home() / "fedhpro-runs" / run_name
    return RunSettings(strategy, experiment, out_dir, get("resume", False, bool), config_path)
