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

    @property
    def variants(self) -> tuple[Variant, ...]:
        return tuple(s if isinstance(s, Variant) else Variant(s, s) for s in self.strategies)


# Every class in every step of FedHPro's server (the paper's; the default before 2026-11-30
# capped the classes a step involves at 32): pins the variants measured at more classes before
FULL_SOFTMAX = "fedhpro.recal_classes_per_step=0 fedhpro.hp_softmax_classes=0"

# FedHPro's recalibration as the paper (and the reference code) make it: features matched to the
# clients' classifier gradients, the classifier trained by minibatch SGD over every class. With
# every class in the hyper-prototypes' matching too, FedHPro's default before 2026-11-30
# (benchmarks/recal-default), so the rows measured before then name it
PAPER_RECAL_ALONE = ("fedhpro.recal_source=gradients fedhpro.recal_solver=sgd "
                     "fedhpro.recal_classes_per_step=0")
PAPER_RECAL = f"{PAPER_RECAL_ALONE} fedhpro.hp_softmax_classes=0"

# The re-centred fix of the paper's recalibration (benchmarks/ablation)
RECAL_FIX = "fedhpro.recal_after_training=true fedhpro.recal_recentre=true"

# FedHPro as configured but sending its per-class statistics as float16: the upload option
FLOAT16 = Variant("fedhpro-float16", "fedhpro", "fedhpro.float16_upload=true")

DEFAULT_SETTINGS = (Setting("digits-offline", "conf/default.yaml"),
                    Setting("mnist-dir0.1", "conf/mnist-dir0.1.yaml"),
                    Setting("mnist-dir0.5", "conf/mnist-dir0.5.yaml"),
                    Setting("mnist-lt", "conf/mnist-lt.yaml"))
GLYPHS100_LT = Setting("glyphs100-lt", "conf/glyphs100-lt.yaml")  # 100 classes, long tail
GLYPHS100_DIR01 = Setting("glyphs100-dir0.1", "conf/glyphs100-dir0.1.yaml")  # strong label skew
GLYPHS400_LT = Setting("glyphs400-lt", "conf/glyphs400-lt.yaml")  # 400 classes, long tail


def with_paper_recal(name: str, overrides: str = "") -> Variant:
    """A FedHPro variant measured when the paper's recalibration was the default, pinned to it
    so that its suite still measures what its committed results show."""
    return Variant(name, "fedhpro", f"{PAPER_RECAL} {overrides}".strip())


# FedHPro with one part switched off or changed at a time (the paper's method first)
ABLATIONS = (
    with_paper_recal("fedhpro"),
    with_paper_recal("fedhpro-fixed-anchors", "fedhpro.rounds_of_hp=0"),
    with_paper_recal("fedhpro-mse-matching", "fedhpro.distance=mse"),
    with_paper_recal("fedhpro-no-hpcl", "fedhpro.w_cl=0"),
    with_paper_recal("fedhpro-no-hpal", "fedhpro.w_al=0"),
    with_paper_recal("fedhpro-no-margin", "fedhpro.margin=false"),
    Variant("fedhpro-no-recalibration", "fedhpro", "fedhpro.recalibration=false"),
    with_paper_recal("fedhpro-one-hp-per-class", "fedhpro.num_hyperprototypes=1"),
    # the fixes proposed for the two questions the ablation raised (see benchmarks/ablation)
    with_paper_recal("fedhpro-recal-fix", RECAL_FIX),
    with_paper_recal("fedhpro-normalized-steps", "fedhpro.hp_step=normalized fedhpro.lr_hp=0.01"),
    # the reference code's per-scalar matching, and orthogonal hyper-prototypes at the start
    with_paper_recal("fedhpro-scalar-distance", "fedhpro.distance=scalar"),
    with_paper_recal("fedhpro-orthogonal-init", "fedhpro.init=orthogonal"),
)

# FedHPro's recalibration from the clients' class moments, with the reference recipe's
# minibatch SGD or one full-batch step per epoch (the default since the recal-default suite)
MOMENTS = Variant("fedhpro-moments", "fedhpro",
                  f"fedhpro.recal_source=moments fedhpro.recal_solver=sgd {FULL_SOFTMAX}")
MOMENTS_FULL_BATCH = Variant(
    "fedhpro-moments-full-batch", "fedhpro",
    f"fedhpro.recal_source=moments fedhpro.recal_solver=full-batch {FULL_SOFTMAX}")

# FedHPro as configured (since 2026-11-30), a server step linear in the classes: the classifier
# trained on groups of 32 classes, the hyper-prototypes matched over their 32 nearest classes
# (with 10 classes, every class in every step)
CLASS_GROUPS = Variant("fedhpro-class-groups", "fedhpro",
                       "fedhpro.recal_classes_per_step=32 fedhpro.hp_softmax_classes=32")

# FedHPro's classifier recalibrations (issue #19): the paper's, from the clients' C x C x d
# classifier gradients; the re-centred fix; from per-class feature moments (C x d + C), with
# the classifier trained as the paper's (by minibatch or full-batch steps) or written down in
# closed form; none
RECALIBRATIONS = (
    with_paper_recal("fedhpro"),
    with_paper_recal("fedhpro-recal-fix", RECAL_FIX),
    MOMENTS,
    MOMENTS_FULL_BATCH,
    Variant("fedhpro-moments-gaussian", "fedhpro",
            f"fedhpro.recal_source=moments fedhpro.recal_solver=gaussian {FULL_SOFTMAX}"),
    CLASS_GROUPS,
    Variant("fedhpro-no-recalibration", "fedhpro",
            f"fedhpro.recalibration=false {FULL_SOFTMAX}"),
)

# The recalibrations at 400 classes (glyphs400-lt): FedHPro as configured (class moments), the
# paper's (C x C x d classifier gradients a client: 82 MB, and about 70 s of server step a round),
# the re-centred fix of it, and none. Only the recalibration's keys change: the hyper-prototypes
# are matched over each class's 32 nearest classes in every variant
RECALIBRATIONS_400 = (
    Variant("fedhpro", "fedhpro"),
    Variant("fedhpro-paper-recal", "fedhpro", PAPER_RECAL_ALONE),
    Variant("fedhpro-recal-fix", "fedhpro", f"{PAPER_RECAL_ALONE} {RECAL_FIX}"),
    Variant("fedhpro-no-recalibration", "fedhpro", "fedhpro.recalibration=false"),
)

# Anchors that learn (issue #20): the paper's matching, fixed random anchors, matching on the
# clients' own-row classifier gradients (where each class lies in feature space; normalized
# steps: plain ones move the hyper-prototypes by 1% a round), the same with the class means
# then moved onto the nearest orthogonal directions, matching on the whole classifier gradients
# of each class (CReFF's target for its features; same steps), and FedProto's prototypes
ROW_ANCHORS = "fedhpro.hp_target=row-grads fedhpro.hp_step=normalized fedhpro.lr_hp=0.01"
ANCHORS = (
    with_paper_recal("fedhpro"),
    with_paper_recal("fedhpro-fixed-anchors", "fedhpro.rounds_of_hp=0"),
    with_paper_recal("fedhpro-row-anchors", ROW_ANCHORS),
    with_paper_recal("fedhpro-separated-row-anchors", ROW_ANCHORS + " fedhpro.hp_separate=true"),
    with_paper_recal("fedhpro-block-anchors", "fedhpro.hp_target=classifier-grads "
                     "fedhpro.hp_step=normalized fedhpro.lr_hp=0.01"),
    Variant("fedproto", "fedproto"),
)

# The anchors suite at 400 classes, where its pinned recalibration (the paper's) would upload
# C x C x d classifier gradients per client (82 MB) and take about 70 s of server step a round:
# FedHPro's default recalibration (class moments), with which the row target sends each class's
# own row alone (C x d). Not run there: the whole-block target (C x C x d again) and separated
# anchors (400 orthogonal directions do not fit in 128 dimensions)
ANCHORS_400 = (
    Variant("fedhpro", "fedhpro"),
    Variant("fedhpro-fixed-anchors", "fedhpro", "fedhpro.rounds_of_hp=0"),
    Variant("fedhpro-row-anchors", "fedhpro", ROW_ANCHORS),
    Variant("fedproto", "fedproto"),
)

# The anchors suite's keys on top of each setting; the recal-default suite uses the same, so
# that the FedHPro runs the two have in common are one and the same run
ANCHOR_SIZING = "train.local_epochs=2 diagnostics.consistency=true"

# Candidates for FedHPro's default recalibration on the default suite's settings (issues #19,
# #23): the paper's; drawn from the clients' class moments (upload linear in C) by minibatch
# or full-batch steps (a tenth of the server's dependent steps)
RECAL_DEFAULTS = (with_paper_recal("fedhpro"), MOMENTS, MOMENTS_FULL_BATCH)

# FedHPro evaluating with its recalibrated classifier but sending the clients the averaged one,
# as CReFF does (the reference code sends the recalibrated one)
RECAL_EVAL_ONLY = Variant("fedhpro-recal-eval-only", "fedhpro", "fedhpro.recal_to_clients=false")

# FedHPro's first rounds on digits-offline at the protocol's tuned recipe (lr 0.05, momentum 0.9,
# w_cl = 1, the validation share held out), each client term switched off in turn, beside FedAvg
# at the same step: what holds the global model at chance in rounds 1-3 (benchmarks/first-rounds)
FIRST_ROUNDS = (
    Variant("fedhpro", "fedhpro"),
    Variant("fedhpro-no-hpcl", "fedhpro", "fedhpro.w_cl=0"),
    Variant("fedhpro-no-hpal", "fedhpro", "fedhpro.w_al=0"),
    Variant("fedhpro-no-margin", "fedhpro", "fedhpro.margin=false"),
    Variant("fedhpro-ce-only", "fedhpro", "fedhpro.w_cl=0 fedhpro.w_al=0"),
    Variant("fedhpro-no-recalibration", "fedhpro", "fedhpro.recalibration=false"),
    RECAL_EVAL_ONLY,
    Variant("fedavg", "fedavg"),
)

# The protocol's settings with FedHPro's tuned recipe in each (benchmarks/protocol/tuning/
# chosen.yaml) and its table's sizing, so that a suite's plain FedHPro runs are the table's own
PROTOCOL_SIZING = ("train.local_epochs=2 data.validation_fraction=0.1 fedhpro.w_cl=1 "
                   "federation.server_threads=2")
AT_FEDHPRO_TUNED = (
    Setting("digits-offline", "conf/default.yaml", "train.lr=0.05 train.momentum=0.9"),
    Setting("mnist-dir0.1", "conf/mnist-dir0.1.yaml", "train.lr=0.05 train.momentum=0"),
    Setting("mnist-lt", "conf/mnist-lt.yaml", "train.lr=0.05 train.momentum=0"),
)

SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite(
        "smoke", "two strategies, one seed, two rounds on 3 clients of the MNIST subset (CI)",
        (Setting("mnist-dir0.5", "conf/mnist-dir0.5.yaml", "partition.num_partitions=3"),),
        ("fedavg", "fedhpro"), (0,), rounds=2,
        overrides="train.local_epochs=1 fedhpro.recal_epochs=20 fedhpro.rounds_of_hp=10",
    ),
    Suite(
        "default", "the offline benchmarks, every strategy (and FedHPro with float16 gradient "
        "uploads), 3 seeds; 60-80 minutes on 2 CPU cores",
        DEFAULT_SETTINGS, (*ALL_STRATEGIES, FLOAT16), (0, 1, 2), rounds=10,
        overrides="train.local_epochs=2",
    ),
    Suite(
        "ablation", "FedHPro with one part switched off at a time, on the default suite's "
        "settings, 3 seeds; about 2.5 hours on 2 CPU cores",
        DEFAULT_SETTINGS, ABLATIONS, (0, 1, 2), rounds=10, overrides="train.local_epochs=2",
    ),
    Suite(
        "recalibration", "FedHPro's classifier recalibrations against each other under a long "
        "tail, on the MNIST subset and on 100 generated glyph classes, 5 seeds; about 2 hours "
        "on 2 CPU cores",
        (DEFAULT_SETTINGS[3], GLYPHS100_LT),
        RECALIBRATIONS, (0, 1, 2, 3, 4), rounds=20, overrides="train.local_epochs=2",
    ),
    Suite(
        "recalibration-400", "FedHPro's recalibrations on 400 glyph classes under a long tail: "
        "as configured, the paper's, the re-centred fix and none, 5 seeds, 10 rounds (the "
        "paper's costs about a minute of server step a round)",
        (GLYPHS400_LT,), RECALIBRATIONS_400, (0, 1, 2, 3, 4), rounds=10,
        overrides="train.local_epochs=2",
    ),
    Suite(
        "anchors", "FedHPro's hyper-prototype matching targets against fixed anchors and "
        "FedProto, with the anchors' diagnostics, on the default suite's settings and 100 "
        "glyph classes (long tail, Dirichlet 0.1), 5 seeds",
        (*DEFAULT_SETTINGS, GLYPHS100_LT, GLYPHS100_DIR01), ANCHORS, (0, 1, 2, 3, 4), rounds=10,
        overrides=ANCHOR_SIZING,
    ),
    Suite(
        "anchors-400", "the anchors suite on 400 glyph classes under a long tail, with FedHPro's "
        "default recalibration (class moments; the paper's would upload C x C x d per client), "
        "5 seeds",
        (GLYPHS400_LT,), ANCHORS_400, (0, 1, 2, 3, 4), rounds=10, overrides=ANCHOR_SIZING,
    ),
    Suite(
        "recal-default", "FedHPro's recalibration as the paper makes it (the default then) "
        "against the two candidates drawn from class moments, on the default suite's settings, "
        "5 seeds (sized as the anchors suite, whose FedHPro runs it shares)",
        DEFAULT_SETTINGS, RECAL_DEFAULTS, (0, 1, 2, 3, 4), rounds=10,
        overrides=ANCHOR_SIZING,
    ),
    Suite(
        "first-rounds", "FedHPro's first 5 rounds on digits-offline at the protocol's tuned "
        "recipe with each client term (and the recalibration) switched off in turn, beside "
        "FedAvg, 5 seeds; about 20 minutes on 2 CPU cores",
        AT_FEDHPRO_TUNED[:1], FIRST_ROUNDS, (0, 1, 2, 3, 4), rounds=5,
        overrides=PROTOCOL_SIZING,
    ),
    Suite(
        "recal-to-clients", "FedHPro sending its clients the recalibrated classifier (the "
        "reference code's) or the averaged one (CReFF's), at the protocol's tuned recipe and "
        "length, 5 seeds; the plain FedHPro runs are the protocol table's",
        AT_FEDHPRO_TUNED, (Variant("fedhpro", "fedhpro"), RECAL_EVAL_ONLY), (0, 1, 2, 3, 4),
        rounds=30, overrides=PROTOCOL_SIZING,
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
        "recalibration, the same matching: 73.5 s at 400 classes in benchmarks/server_scaling.csv)",
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
