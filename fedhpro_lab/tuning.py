"""Hyper-parameters chosen on a validation share, with the same budget for every method.

Every (method, setting) gets the same number of trials (`TRIALS` = 8 by default) on one seed:
points of the local learning rate x momentum x two values of the method's own main knob
(`KNOBS`; a method without one, like FedAvg, gets two more learning rates instead), taken in
`ORDER` so that a smaller budget still varies every key. Successive halving spends the budget:
every trial runs a quarter of the rounds, the best `FINALISTS` continue from their checkpoints
to half of them. A trial's score is its mean validation accuracy over its last 5 rounds
(`data.validation_fraction` of the training pool, never the test set).

Short rungs pick steps that a long table cannot survive (the first edition lost 11 of 155
tuned runs that way), so the ranking is only a list of candidates: each is re-checked at the
table's full length on a second seed (`RECHECK_OFFSET`), in rank order, and the first that does
not collapse (`stability.collapse`: diverged, never left chance, or fell back) is the
method's recipe (`chosen.yaml`). A trial that collapsed at a rung is ranked after every one
that did not and is not re-checked; a method whose candidates all collapse keeps its best-ranked
trial, flagged unstable. The baseline's re-check also sets the full length: it grows until its
validation curve has flattened (`convergence`), so that no test accuracy decides anything.

`PUBLISHED` holds each method's recipe as its authors' code ships it, for the rows beside the
tuned ones; the setting's rounds, local epochs and batch size stay the same for every row.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from fedhpro_lab import convergence
from fedhpro_lab.benchmark import finished_here, holds_rounds, plan, read_results, scored_rounds
from fedhpro_lab.stability import collapse
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
TRIALS = len(LEARNING_RATES) * len(MOMENTA) * 2  # the whole grid, the default budget
# the grid's points in the order a budget takes them (a point's bits: learning rate, momentum,
# knob): any first two differ in every key, any first four try both values of each
ORDER = (0, 7, 3, 4, 1, 6, 2, 5)
RUNGS = (0.25, 0.5)  # successive halving: the share of the full length each rung runs
FINALISTS = 2  # trials that go on from the first rung
RECHECK_OFFSET = 1  # the re-check's seed: the tuning seed + 1
RECHECKS = 3  # candidates a method may try at full length before it is called unstable
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


def with_validation(setting: Setting) -> Setting:
    """The setting with `VALIDATION` held out: how every protocol run sees its data (the
    tuning's, the probe's and the table's, so that all train on the same clients' data)."""
    return replace(setting, overrides=f"{setting.overrides} {VALIDATION}".strip())


def check_budget(budget: int) -> None:
    if not 1 <= budget <= TRIALS:
        raise ValueError(f"--trials {budget}: between 1 and {TRIALS} (the grid of learning "
                         f"rate x momentum x the method's own knob)")


def trials(method: str, budget: int = TRIALS) -> list[Trial]:
    """The method's first `budget` points of learning rate x momentum x its knob, in `ORDER`;
    a trial keeps its grid index (its name) whatever the budget."""
    check_budget(budget)
    if method in KNOBS:
        key, values = KNOBS[method]
        grid = itertools.product(LEARNING_RATES, MOMENTA, values)
        points = [(("train.lr", lr), ("train.momentum", m), (key, v)) for lr, m, v in grid]
    else:
        grid = itertools.product(LEARNING_RATES + EXTRA_LEARNING_RATES, MOMENTA)
        points = [(("train.lr", lr), ("train.momentum", m)) for lr, m in grid]
    return [Trial(method, i, points[i]) for i in ORDER[:budget]]


def rung_rounds(rounds: int, share: float) -> int:
    """A rung's length: its share of the full length, at least `LAST` rounds (a score's
    window) and at most the full length."""
    return min(rounds, max(round(rounds * share), LAST))


def score(results_json: Path, rounds: int) -> float:
    """Mean validation accuracy over the last `LAST` of the run's first `rounds` rounds (NaN
    if none recorded; a diverged trial's as `scored_rounds` completes them): a rung's score,
    also when the run has since gone on to a later rung."""
    results = read_results(results_json)
    rows = scored_rounds(results, rounds)[:rounds] if results else []
    values = [r["val_accuracy"] for r in rows[-LAST:] if "val_accuracy" in r]
    return sum(values) / len(values) if values else float("nan")


def curve_collapse(results: dict[str, Any] | None, rounds: int) -> str | None:
    """Why a trial's validation curve over its first `rounds` rounds collapsed, or None."""
    if results is None:
        return "no results"
    rows = scored_rounds(results, rounds)[:rounds]
    diverged = results.get("diverged_round")
    return collapse([r.get("val_accuracy", float("nan")) for r in rows],
                    int(results.get("num_classes") or 2),
                    diverged if diverged is not None and diverged <= rounds else None)


def promoted(scores: dict[Trial, float], keep: int,
             collapsed: frozenset[Trial] = frozenset()) -> list[Trial]:
    """The `keep` best trials; collapsed ones after every other, ties (and NaN, ranked last)
    broken by the order the budget took them in."""
    order = {trial: i for i, trial in enumerate(scores)}

    def rank(trial: Trial) -> tuple[bool, float, int]:
        value = scores[trial]
        return trial in collapsed, -value if value == value else float("inf"), order[trial]

    return sorted(scores, key=rank)[:keep]


class TuningIncomplete(RuntimeError):
    """A trial did not run all the rounds it was asked for, so it cannot be scored."""


@dataclass(frozen=True)
class Length:
    """How long the table runs: `least` rounds, grown by `convergence.EXTEND_BY` while the
    baseline's re-check has not flattened, `cap` at most; exactly `least` when not `grow`."""

    least: int
    cap: int = convergence.MAX_ROUNDS
    grow: bool = True


RunSuite = Callable[..., Path]


@dataclass
class Tuning:
    """The tuning of `methods` on `setting` (rounds: the length its rungs are shares of; the
    table's least length) into `out`, with `budget` trials a method."""

    setting: Setting
    methods: tuple[str, ...]
    rounds: int
    seed: int
    out: Path
    overrides: str = ""
    budget: int = TRIALS

    def suite(self, alive: list[Trial], rounds: int, seed: int | None = None) -> Suite:
        return Suite("tuning", f"tuning on {self.setting.name}",
                     (with_validation(self.setting),),
                     tuple(t.variant() for t in alive), (self.seed if seed is None else seed,),
                     rounds, overrides=self.overrides)

    @property
    def recheck_seed(self) -> int:
        return self.seed + RECHECK_OFFSET

    def results(self, trial: Trial, seed: int | None = None) -> Path:
        return run_path(self.out, self.setting.name, trial.name,
                        self.seed if seed is None else seed) / "results.json"

    def held(self, trial: Trial, seed: int | None = None) -> dict[str, Any] | None:
        return read_results(self.results(trial, seed))

    def ensure(self, run_suite: RunSuite, batch: list[Trial], rounds: int, seed: int,
               timeout: float | None) -> None:
        """Run the trials of `batch` that do not hold `rounds` rounds on `seed` yet (a trial
        taken further already is done: run again at this length, it would start afresh
        wherever its checkpoint is gone; one made under another setup, a default changed
        since, runs again)."""
        suite = self.suite(batch, rounds, seed)
        finished = {r.strategy for r in plan(suite, self.out) if finished_here(r)}
        short = [t for t in batch if t.name not in finished]
        if short:
            run_suite(self.suite(short, rounds, seed), self.out, timeout)
        short = [t.name for t in batch if not holds_rounds(self.held(t, seed), rounds)]
        if short:  # a score over fewer rounds is not comparable: never choose on one
            raise TuningIncomplete(
                f"tuning on {self.setting.name}: {', '.join(short)} did not reach {rounds} "
                f"rounds on seed {seed} (their reasons: {self.out / 'results.csv'}); run the "
                f"same command again once the cause is fixed: finished trials are kept")

    def halve(self, run_suite: RunSuite, timeout: float | None = None
              ) -> tuple[list[dict[str, Any]], dict[str, list[Trial]]]:
        """Successive halving on the tuning seed: the record of every rung, and each method's
        trials ranked, the finalists first, each group in the order of its last rung."""
        alive = [t for m in self.methods for t in trials(m, self.budget)]
        rungs, ranked = [], {m: [] for m in self.methods}
        for share in RUNGS:
            rounds = rung_rounds(self.rounds, share)
            self.ensure(run_suite, alive, rounds, self.seed, timeout)
            scores = {t: score(self.results(t), rounds) for t in alive}
            fallen = {t: cause for t in alive
                      if (cause := curve_collapse(self.held(t), rounds)) is not None}
            rungs.append({"rounds": rounds, "scores": {t.name: scores[t] for t in alive},
                          "collapsed": {t.name: cause for t, cause in fallen.items()}})
            keep = FINALISTS if share != RUNGS[-1] else len(alive)
            going_on = []
            for m in self.methods:
                mine = {t: s for t, s in scores.items() if t.method == m}
                order = promoted(mine, len(mine), frozenset(fallen))
                ranked[m] = order + [t for t in ranked[m] if t not in order]
                going_on += order[:keep]
            alive = going_on
        return rungs, ranked

    def check_at_length(self, run_suite: RunSuite, trial: Trial, length: Length,
                        timeout: float | None) -> tuple[int, str | None]:
        """The baseline's re-check: `length.least` rounds, then more while its validation
        curve has not flattened (continued from its checkpoint); the length reached and why
        it collapsed, if it did."""
        rounds = length.least
        while True:
            self.ensure(run_suite, [trial], rounds, self.recheck_seed, timeout)
            results = self.held(trial, self.recheck_seed)
            cause = curve_collapse(results, rounds)
            curve = [r.get("val_accuracy", float("nan"))
                     for r in scored_rounds(results, rounds)[:rounds]]
            if (cause or not length.grow or rounds >= length.cap
                    or convergence.flattened(curve)):
                return rounds, cause
            rounds = min(rounds + convergence.EXTEND_BY, length.cap)
            print(f"tuning on {self.setting.name}: {trial.name}'s validation curve moved "
                  f"{100 * convergence.moving_change(curve):+.2f} points over its last "
                  f"{convergence.SPAN} rounds; re-checking it to {rounds}", flush=True)

    def run(self, run_suite: RunSuite, timeout: float | None = None,
            length: Length | None = None) -> dict[str, Any]:
        """Halving, then the re-checks at full length; returns the record of scores by rung,
        every re-check, the full length and the chosen recipe of every method."""
        length = length or Length(self.rounds)
        rungs, ranked = self.halve(run_suite, timeout)
        record: dict[str, Any] = {"setting": self.setting.name, "seed": self.seed,
                                  "rounds": self.rounds, "budget": self.budget,
                                  "rungs": rungs, "recheck_seed": self.recheck_seed,
                                  "rechecks": {m: [] for m in self.methods}}
        fallen = {name for rung in rungs for name in rung["collapsed"]}
        # a trial that collapsed at a rung is out already: only the others are re-checked
        candidates = {m: [t for t in ranked[m] if t.name not in fallen][:RECHECKS]
                      for m in self.methods}
        chosen: dict[str, Trial] = {}
        unstable: list[str] = []

        def note(trial: Trial, rounds: int, cause: str | None) -> None:
            record["rechecks"][trial.method].append(
                {"trial": trial.name, "rounds": rounds, "collapse": cause,
                 "score": score(self.results(trial, self.recheck_seed), rounds)})
            if cause is None:
                chosen[trial.method] = trial

        lead = convergence.baseline(self.methods)
        full = length.least
        for trial in candidates[lead]:
            full, cause = self.check_at_length(run_suite, trial, length, timeout)
            note(trial, full, cause)
            if cause is None:
                break
        pending = {m: list(candidates[m]) for m in self.methods if m != lead}
        while pending:
            batch = [left[0] for left in pending.values()]
            self.ensure(run_suite, batch, full, self.recheck_seed, timeout)
            for trial in batch:
                pending[trial.method].pop(0)
                note(trial, full, curve_collapse(self.held(trial, self.recheck_seed), full))
                if trial.method in chosen or not pending[trial.method]:
                    del pending[trial.method]
        for m in self.methods:
            if m not in chosen:  # every candidate collapsed: the best-ranked one, flagged
                chosen[m], unstable = (candidates[m] or ranked[m])[0], [*unstable, m]
        record.update(length=full, cap=length.cap, grow=length.grow, unstable=unstable,
                      chosen={m: chosen[m].overrides for m in self.methods})
        return record


def write_chosen(path: Path, records: list[dict[str, Any]]) -> None:
    """chosen.yaml: per setting, per method, the winning overrides (what a user passes as
    `overrides` to run a method as tuned)."""
    chosen = {r["setting"]: r["chosen"] for r in records}
    path.write_text("# written by fedhpro-bench: the tuned overrides, by setting and method\n"
                    + yaml.safe_dump(chosen, sort_keys=False))


def read_chosen(path: Path) -> dict[str, dict[str, str]]:
    return yaml.safe_load(path.read_text()) or {}
