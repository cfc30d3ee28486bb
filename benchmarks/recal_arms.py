"""Three arms out of the recal-to-clients suite's two rows, paired by seed against FedHPro.

    python benchmarks/recal_arms.py [benchmarks/recal-to-clients] [--rounds 30]

`fedhpro-recal-eval-only` runs record two classifiers each round: the recalibrated one they
are scored with, and the averaged one the clients were sent (`aggregated_head_accuracy`).
Since that run's training is exactly FedHPro's without recalibration (first-rounds findings),
the second is the no-recalibration arm at no extra cost. Per setting: each arm's mean over
seeds of its last-5-round accuracy [95% interval], and its difference to FedHPro in points,
paired by seed, with win / tie / loss. Diverged runs count at their last accuracy, as in the
protocol (`benchmark.scored_rounds`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedhpro_lab import stats
from fedhpro_lab.benchmark import scored_rounds
from fedhpro_lab.suites import SUITES, run_path

ARMS = (("FedHPro (recalibrated classifier sent)", "fedhpro", "accuracy"),
        ("recalibrated classifier, averaged one sent", "fedhpro-recal-eval-only", "accuracy"),
        ("averaged classifier (no recalibration)", "fedhpro-recal-eval-only",
         "aggregated_head_accuracy"))


def last5(out: Path, setting: str, variant: str, seed: int, key: str,
          rounds: int) -> float | None:
    """The run's mean of `key` over its last 5 of `rounds` rounds; None if it has not run them."""
    path = run_path(out, setting, variant, seed) / "results.json"
    if not path.is_file():
        return None
    curve = scored_rounds(json.loads(path.read_text()), rounds)[:rounds]
    if len(curve) < rounds:
        return None
    return stats.mean([row.get(key, row["accuracy"]) for row in curve[-5:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("benchmarks/recal-to-clients"))
    parser.add_argument("--rounds", type=int, default=SUITES["recal-to-clients"].rounds)
    args = parser.parse_args()
    suite = SUITES["recal-to-clients"]
    for setting in suite.settings:
        scores = {name: {seed: value for seed in suite.seeds
                         if (value := last5(args.out, setting.name, variant, seed, key,
                                            args.rounds)) is not None}
                  for name, variant, key in ARMS}
        print(f"\n{setting.name}, last 5 of {args.rounds} rounds\n\n"
              "| arm | seeds | accuracy | minus FedHPro | W/T/L |\n|---|---|---|---|---|")
        reference = scores[ARMS[0][0]]
        for name, values in scores.items():
            if not values:
                continue
            diff, verdict = (("—", "—") if values is reference
                             else stats.paired_text(values, reference))
            print(f"| {name} | {len(values)} | {stats.interval_text(list(values.values()))} | "
                  f"{diff} | {verdict} |")


if __name__ == "__main__":
    main()
