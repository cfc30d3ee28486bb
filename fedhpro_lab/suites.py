"""The benchmark suites: which settings, strategies and seeds `fedhpro-bench` runs.

A setting is an experiment YAML from conf/ plus the keys the suite sets on top of it; a suite
runs every variant (a strategy, possibly with keys of its own: the ablations) on every setting
with every seed. Runs of the same (setting, seed) share partitions, initial weights and
hyper-prototype seeds, whatever the variant: all of them come from the experiment's seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fedhpro_flwr.methods import METHODS

ALL_STRATEGIES = tuple(METHODS)  # every registered method, in the registry's order
# the methods that run with personal models (heterogeneous backbones)
PERSONAL = tuple(name for name, m in METHODS.items() if m.personal_weights is not None)


T = TypeVar("T")


def select_named(items: Sequence[T], names: str, name_of: Callable[[T], str],
                 what: str) -> tuple[T, ...]:
    """The `items` named in a comma-separated list, in their own order (all when the list is
    empty), so that one part of a suite can be run first: the same runs as the whole."""
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    known = [name_of(item) for item in items]
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ValueError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return tuple(item for item in items if not wanted or name_of(item) in wanted)


def run_path(out: Path, setting: str, variant: str, seed: str | int) -> Path:
    """Where a suite run under `out` writes its results.json and checkpoint."""
    return out / "runs" / setting / variant / f"seed{seed}"


@dataclass(frozen=True)
class Setting:
    name: str
    config: str  # experiment YAML, relative to the app directory
    overrides: str = ""  # dotted YAML keys set on top of the file


@dataclass(frozen=True)
class Variant:
    """One row of a suite's tables: a registered strategy run with `overrides` on top."""

    name: str
    strategy: str
    overrides: str = ""


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    settings: tuple[Setting, ...]
    strategies: tuple[str | Variant, ...]  # a bare name is that strategy as configured
    seeds: tuple[int, ...]
    rounds: int  # 0 = each YAML's federation.rounds
    overrides: str = ""  # applied to every setting (the suite's sizing)
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    attack: str = ""  # KIND:CLIENTS[:FACTOR] of `attacks.Attack`: clients that lie in every run

    @property
    def variants(self) -> tuple[Variant, ...]:
        return tuple(s if isinstance(s, Variant) else Variant(s, s) for s in self.strategies)


# FedHPro's recalibration as the paper (and the reference code) make it: features matched to the
# clients' classifier gradients, the classifier trained by minibatch SGD over every class, and
# every class in the hyper-prototypes' matching too (FedHPro's published recipe)
PAPER_RECAL = ("fedhpro.recal_source=gradients fedhpro.recal_solver=sgd "
               "fedhpro.recal_classes_per_step=0 fedhpro.hp_softmax_classes=0")

# FedHPro as configured but sending its per-class statistics as float16: the upload option
FLOAT16 = Variant("fedhpro-float16", "fedhpro", "fedhpro.float16_upload=true")

DEFAULT_SETTINGS = (Setting("digits-offline", "conf/default.yaml"),
                    Setting("mnist-dir0.1", "conf/mnist-dir0.1.yaml"),
                    Setting("mnist-dir0.5", "conf/mnist-dir0.5.yaml"),
                    Setting("mnist-lt", "conf/mnist-lt.yaml"))
GLYPHS100_LT = Setting("glyphs100-lt", "conf/glyphs100-lt.yaml")  # 100 classes, long tail
GLYPHS100_DIR01 = Setting("glyphs100-dir0.1", "conf/glyphs100-dir0.1.yaml")  # strong label skew
GLYPHS400_LT = Setting("glyphs400-lt", "conf/glyphs400-lt.yaml")  # 400 classes, long tail

SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite(
        "smoke", "every strategy, one seed, two rounds on 3 clients of the MNIST subset (CI)",
        (Setting("mnist-dir0.5", "conf/mnist-dir0.5.yaml", "partition.num_partitions=3"),),
        ALL_STRATEGIES, (0,), rounds=2,
        overrides="train.local_epochs=1 fedhpro.recal_epochs=20 fedhpro.rounds_of_hp=10",
    ),
    Suite(
        "default", "the offline benchmarks, every strategy (and FedHPro with float16 gradient "
        "uploads), 3 seeds; 60-80 minutes on 2 CPU cores",
        DEFAULT_SETTINGS, (*ALL_STRATEGIES, FLOAT16), (0, 1, 2), rounds=10,
        overrides="train.local_epochs=2",
    ),
    Suite(
        "many-class", "every strategy on 100 generated glyph classes, under a long tail "
        "(imbalance 100, then Dirichlet 0.5: CIFAR-100-LT's protocol) and under Dirichlet 0.1, "
        "5 seeds",
        (GLYPHS100_LT, GLYPHS100_DIR01),
        ALL_STRATEGIES, (0, 1, 2, 3, 4), rounds=20, overrides="train.local_epochs=2",
    ),
    Suite(
        "many-class-400", "the many-class suite at 400 glyph classes, long tail; without CReFF, "
        "whose server step matches features to C x C x d classifier gradients (FedHPro's paper "
        "recalibration, the same matching: 73.5 s at 400 classes in "
        "benchmarks/measurements/server_scaling.csv)",
        (GLYPHS400_LT,),
        tuple(m for m in ALL_STRATEGIES if m != "creff"), (0, 1, 2, 3, 4), rounds=20,
        overrides="train.local_epochs=2",
    ),
    Suite(
        "diagnostics", "FedHPro's anchors and the prototype methods' global prototypes, measured "
        "the same way (consistency with client prototypes, separation, movement, 2-D pictures), "
        "under strong label skew (mnist-dir0.1), 3 seeds; about 10 minutes on 2 CPU cores",
        DEFAULT_SETTINGS[1:2], ("fedhpro", "fedproto", "fedtgp", "fpl"), (0, 1, 2), rounds=10,
        overrides="train.local_epochs=2 diagnostics.consistency=true "
                  "diagnostics.embedding_rounds=1,10",
    ),
    Suite(
        "hetero", "clients with different backbones (small CNNs and ResNet-10s) on the MNIST "
        "subset: the methods that share only class-level knowledge, personalised accuracy, "
        "3 seeds; about 15 minutes on 2 CPU cores",
        (Setting("hetero", "conf/hetero.yaml"),), PERSONAL, (0, 1, 2),
        rounds=10, overrides="train.local_epochs=2",
    ),
    Suite(
        "scale", "100 clients of the MNIST subset, 10 sampled per round: memory and time stay "
        "bounded",
        (Setting("mnist-100-clients", "conf/mnist-dir0.5.yaml",
                 "partition.num_partitions=100 partition.min_size=5 "
                 "federation.fraction_train=0.1 federation.min_train_nodes=10"),),
        ("fedavg", "fedhpro"), (0,), rounds=5,
    ),
    Suite(
        "paper", "the paper's settings at full size, every strategy, 3 seeds; for a GPU machine",
        (Setting("cifar10-lt", "conf/cifar10-lt.yaml"),
         Setting("cifar100-lt", "conf/cifar100-lt.yaml"),
         Setting("cifar10-dir", "conf/cifar10-dir.yaml"),
         Setting("digits", "conf/digits.yaml"),
         Setting("office-caltech", "conf/office-caltech.yaml"),
         Setting("tiny-imagenet-dir", "conf/tiny-imagenet-dir.yaml"),
         Setting("agnews", "conf/agnews.yaml")),
        ALL_STRATEGIES, (0, 1, 2), rounds=0, gpus_per_client=0.2,
    ),
)}
