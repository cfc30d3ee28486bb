"""The benchmark suites: which settings, strategies and seeds `fedhpro-bench` runs.

A setting is an experiment YAML from conf/ plus the keys the suite sets on top of it; a suite
runs every strategy on every setting with every seed. Runs of the same (setting, seed) share
partitions, initial weights and hyper-prototype seeds, whatever the strategy: all of them
come from the experiment's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_STRATEGIES = ("fedhpro", "fedavg", "fedprox", "fedproto", "fedtgp", "fpl", "creff")


@dataclass(frozen=True)
class Setting:
    name: str
    config: str  # experiment YAML, relative to the app directory
    overrides: str = ""  # dotted YAML keys set on top of the file


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    settings: tuple[Setting, ...]
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    rounds: int  # 0 = each YAML's federation.rounds
    overrides: str = ""  # applied to every setting (the suite's sizing)
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite(
        "smoke", "two strategies, one seed, two rounds on 3 clients of the MNIST subset (CI)",
        (Setting("mnist-dir0.5", "conf/mnist-dir0.5.yaml", "partition.num_partitions=3"),),
        ("fedavg", "fedhpro"), (0,), rounds=2,
        overrides="train.local_epochs=1 fedhpro.recal_epochs=20 fedhpro.rounds_of_hp=10",
    ),
    Suite(
        "default", "the offline benchmarks, every strategy, 3 seeds; about an hour on 2 CPU cores",
        (Setting("digits-offline", "conf/default.yaml"),
         Setting("mnist-dir0.1", "conf/mnist-dir0.1.yaml"),
         Setting("mnist-dir0.5", "conf/mnist-dir0.5.yaml"),
         Setting("mnist-lt", "conf/mnist-lt.yaml")),
        ALL_STRATEGIES, (0, 1, 2), rounds=10, overrides="train.local_epochs=2",
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
