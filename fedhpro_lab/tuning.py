"""Hyper-parameters chosen on a validation share, with the same budget for every method.

Every (method, setting) gets `TRIALS` = 8 trials on one seed: the local learning rate and
momentum crossed with two values of the method's own main knob (`KNOBS`; a method without one,
like FedAvg, gets two more learning rates instead). Successive halving spends the budget: all
8 trials run a quarter of the rounds, the best two continue from their checkpoints to half of
them, and the better of those wins (a full-length rung would double the cost of tuning on the
2-core machine). A trial's score is its mean validation accuracy over its last 5 rounds
(`data.validation_fraction` of the training pool, never the test set); the winner's keys
become the method's overrides for that setting (`chosen.yaml`).

`PUBLISHED` holds each method's recipe as its authors' code ships it, for the rows beside the
tuned ones; the setting's rounds, local epochs and batch size stay the same for every row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from fedhpro_lab.benchmark import finished_here, holds_rounds, plan, read_results, scored_rounds
from fedhpro_lab.suites import PAPER_RECAL, Setting, Suite, Variant, run_path

LEARNING_RATES = (0.01, 0.05)
MOMENTA = (0.0, 0.9)
EXTRA_LEARNING_RATES = (0.02, 0.1)  # for a method without a knob of its own
# each method's main knob: the config key and the two values tried
KNOBS: dict[str, tuple[str, tuple[float, ...]]] = {
    # the paper's weight, and the reference code's effective 1/B (HPCL's mean divided by the
    # batch size 64 again)
    "fedhpro": ("fedhpro.w_cl", (1.0, 1 / 64)),
    "fedprox": ("fedprox.mu", (0.01, 0.1)),
    "fedproto": ("fedproto.lam", (0.1, 1.0)),
    "fedtgp": ("fedtgp.lam", (1.0, 10.0)),
    "fpl": ("fpl.tau", (0.02, 0.1)),
    "creff": ("creff.lr", (0.01, 0.1)),  # the classifier re-training's learning rate
    "moon": ("moon.mu", (1.0, 5.0)),  # its main.py default, its README's CIFAR-10 example
    # its main.py default, and prototypes that move five times faster towards the class means
    "fednh": ("fednh.rho", (0.9, 0.5)),
    "fedsa": ("fedsa.lam", (1.0, 10.0)),  # its main.py default, its scripts' lam
}
TRIALS = len(LEARNING_RATES) * len(MOMENTA) * 2
RUNGS = ((0.25, 2), (0.5, 1))  # (share of the rounds, how many trials go on)
VALIDATION = "data.validation_fraction=0.1"
LAST = 5  # rounds averaged into a score

# As the authors' code ships each method (optimiser and the method's own keys).
PUBLISHED: dict[str, str] = {
    # the reference code: SGD lr 0.1 without momentum, HPCL divided by the batch size again,
    # no margin, the classifier recalibrated from matched classifier gradients by minibatch SGD
    "fedhpro": "train.lr=0.1 train.momentum=0.0 fedhpro.w_cl=0.015625 fedhpro.margin=false "
               + PAPER_RECAL,
    "fedavg": "train.lr=0.01 train.momentum=0.0",  # FedProx's code base, plain SGD
    "fedprox": "train.lr=0.01 train.momentum=0.0 fedprox.mu=0.01",  # as CReFF's code runs it
    "fedproto": "train.lr=0.01 train.momentum=0.5 fedproto.lam=1.0",  # its options.py
    "fedtgp": "train.lr=0.01 train.momentum=0.0 fedtgp.lam=10.0",  # its main.py
    "fpl": "train.lr=0.01 train.momentum=0.9 train.weight_decay=0.00001 fpl.tau=0.02",
    "creff": "train.lr=0.1 train.momentum=0.0 creff.lr=0.01",  # its options.py
    # its main.py's SGD (momentum 0.9, weight decay 1e-5) at its README's CIFAR-10 example
    # (lr 0.01, mu 5; main.py's default mu is 1)
    "moon": "train.lr=0.01 train.momentum=0.9 train.weight_decay=0.00001 moon.mu=5.0",
    # experiments/FedNH_dir.sh's SGD (less its diminishing learning rate: the train section
    # has no schedule) and main.py's smoothing
    "fednh": "train.lr=0.01 train.momentum=0.9 train.weight_decay=0.00001 fednh.rho=0.9",
    # its scripts' runs ("system/cross-device setting.sh": lam 10, mcl 1, cc 1 at lr 0.01;
    # main.py's defaults are lam 1, lr 0.005), its clients' plain SGD
    "fedsa": "train.lr=0.01 train.momentum=0.0 fedsa.lam=10.0",
}


@dataclass(frozen=True)
class Trial:
    """One point of a method's search space."""

    method: str
    index: int
    keys: tuple[tuple[str, float], ...]  # (config key, value)

    @property
    def name(self) -> str:
        return f"{self.method}-t{self.index}"

    @property
    def overrides(self) -> str:
        return " ".join(f"{key}={value:g}" for key, value in self.keys)

    def variant(self) -> Variant:
        return Variant(self.name, self.method, self.overrides)


def trials(method: str) -> list[Trial]:
    """The method's `TRIALS` points: learning rate x momentum x its knob's values."""
    if method in KNOBS:
        key, values = KNOBS[method]
        grid = itertools.product(LEARNING_RATES, MOMENTA, values)
        points = [(("train.lr", lr), ("train.momentum", m), (key, v)) for lr, m, v in grid]
    else:
        grid = itertools.product(LEARNING_RATES + EXTRA_LEARNING_RATES, MOMENTA)
        points = [(("train.lr", lr), ("train.momentum", m)) for lr, m in grid]
    return [Trial(method, i, keys) for i, keys in enumerate(points)]


def score(results_json: Path, rounds: int) -> float:
    """Mean validation accuracy over the last `LAST` of the run's first `rounds` rounds (NaN
    if none recorded; a diverged trial's as `scored_rounds` completes them): a rung's score,
    also when the run has since gone on to a later rung."""
    results = read_results(results_json)
    rows = scored_rounds(results, rounds)[:rounds] if results else []
    values = [r["val_accuracy"] for r in rows[-LAST:] if "val_accuracy" in r]
    return sum(values) / len(values) if values else float("nan")


def promoted(scores: dict[Trial, float], keep: int) -> list[Trial]:
    """The `keep` best trials, ties (and NaN, ranked last) broken by trial order."""
    def rank(trial: Trial) -> tuple[float, int]:
        value = scores[trial]
        return (-value if value == value else float("inf"), trial.index)

    return sorted(scores, key=rank)[:keep]


class TuningIncomplete(RuntimeError):
    """A rung's trial did not run all its rounds, so the rung cannot be scored."""


@dataclass
class Tuning:
    """The tuning of `methods` on `setting` (rounds: the full length) into `out`."""

    setting: Setting
    methods: tuple[str, ...]
    rounds: int
    seed: int
    out: Path
    overrides: str = ""

    def suite(self, alive: list[Trial], rounds: int) -> Suite:
        return Suite("tuning", f"tuning on {self.setting.name}",
                     (replace(self.setting, overrides=f"{self.setting.overrides} "
                                                      f"{VALIDATION}".strip()),),
                     tuple(t.variant() for t in alive), (self.seed,), rounds,
                     overrides=self.overrides)

    def results(self, trial: Trial) -> Path:
        return run_path(self.out, self.setting.name, trial.name, self.seed) / "results.json"

    def run(self, run_suite: Any, timeout: float | None = None) -> dict[str, Any]:
        """Every rung in turn (a trial holding a rung's rounds already is not run again);
        returns the record of scores by rung and the winner of every method."""
        alive = [t for m in self.methods for t in trials(m)]
        record: dict[str, Any] = {"setting": self.setting.name, "seed": self.seed,
                                  "rounds": self.rounds, "rungs": []}
        for share, keep in RUNGS:
            rounds = max(round(self.rounds * share), LAST)
            # a trial a later rung already took further is done here (run again at this
            # rung's length, it would start afresh wherever its checkpoint is gone or stale);
            # one made under another setup (a default changed since) is not
            finished = {r.strategy for r in plan(self.suite(alive, rounds), self.out)
                        if finished_here(r)}
            short = [t for t in alive if t.name not in finished]
            if short:
                run_suite(self.suite(short, rounds), self.out, timeout)
            short = [t.name for t in alive
                     if not holds_rounds(read_results(self.results(t)), rounds)]
            if short:  # a score over fewer rounds is not comparable: never choose on one
                raise TuningIncomplete(
                    f"tuning on {self.setting.name}: {', '.join(short)} did not reach {rounds} "
                    f"rounds (their reasons: {self.out / 'results.csv'}); run the same command "
                    f"again once the cause is fixed: finished trials are kept")
            scores = {t: score(self.results(t), rounds) for t in alive}
            record["rungs"].append({"rounds": rounds,
                                    "scores": {t.name: scores[t] for t in alive}})
            alive = [t for m in self.methods
                     for t in promoted({t: s for t, s in scores.items() if t.method == m},
                                       keep)]
        record["chosen"] = {t.method: t.overrides for t in alive}
        return record


def write_chosen(path: Path, records: list[dict[str, Any]]) -> None:
    """chosen.yaml: per setting, per method, the winning overrides (what a user passes as
    `overrides` to run a method as tuned)."""
    chosen = {r["setting"]: r["chosen"] for r in records}
    path.write_text("# written by fedhpro-bench: the tuned overrides, by setting and method\n"
                    + yaml.safe_dump(chosen, sort_keys=False))


def read_chosen(path: Path) -> dict[str, dict[str, str]]:
    return yaml.safe_load(path.read_text()) or {}
