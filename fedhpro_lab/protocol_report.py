"""RESULTS.md of the comparison protocol (see `protocol`), and the tuning's TRIALS.md.

Per setting: every method as tuned and as published, the mean over seeds of each run's mean
accuracy over its last 5 rounds with a 95% Student-t interval, the best round, rounds and
megabytes (up + down) until a run first reaches 95% of tuned FedAvg's median accuracy, client time,
and FedHPro minus the method paired by seed with its interval and win / tie / loss (a published
recipe against FedHPro's published one, a tuned one against tuned FedHPro); then the
convergence check, runs that collapsed, and a plot of every seed's curve.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from fedhpro_lab import archive, convergence, stats
from fedhpro_lab.benchmark import SCORED, scored_rounds
from fedhpro_lab.protocol import published_name, read_plan
from fedhpro_lab.report import machine
from fedhpro_lab.stability import collapse
from fedhpro_lab.suites import run_path
from fedhpro_lab.tuning import FINALISTS, PUBLISHED, read_chosen, trials

METHOD = "fedhpro"
# of the median over seeds of the tuned baseline's accuracy (`convergence.baseline`): a seed
# that diverged does not lower everyone's target
TARGET_SHARE = 0.95
def load_runs(out: Path, setting: str, variant: str, seeds: list[int]) -> list[dict[str, Any]]:
    """Each seed's results.json."""
    return [json.loads((run_path(out, setting, variant, s) / "results.json").read_text())
            for s in seeds]


def to_target(rounds: list[dict[str, Any]], target: float) -> tuple[int, float] | None:
    """(round, megabytes up and down so far) when the run first reaches `target`."""
    sent = 0.0
    for row in rounds:
        sent += row["bytes_up"] + row["bytes_down"]
        if row["accuracy"] >= target:
            return row["round"], sent / 1e6
    return None


def last5_mean(curve: list[dict[str, Any]]) -> float:
    return stats.mean([row["accuracy"] for row in curve[-5:]])


def setting_section(out: Path, setting: str, rows: list[dict[str, str]],
                    methods: list[str]) -> list[str]:
    """The setting's table, convergence check, collapsed runs and plot. Every run is scored at
    the rounds all of them hold: while the protocol extends a table (its baseline first), the
    longer runs are cut to the others' length, so that no pair compares two lengths."""
    by_variant: dict[str, dict[int, dict[str, str]]] = {}
    for row in rows:
        by_variant.setdefault(row["strategy"], {})[int(row["seed"])] = row
    seeds = {v: sorted(runs) for v, runs in by_variant.items()}
    tuned = [m for m in methods if m in by_variant]
    published = [published_name(m) for m in methods if published_name(m) in by_variant]
    variants = tuned + published
    held = {v: min(int(float(by_variant[v][s]["rounds"])) for s in seeds[v]) for v in variants}
    rounds, longest = min(held.values()), max(held.values())
    loaded = {v: load_runs(out, setting, v, seeds[v]) for v in variants}
    full = {v: [scored_rounds(run, held[v])[:held[v]] for run in loaded[v]] for v in variants}
    curves = {v: [curve[:rounds] for curve in full[v]] for v in variants}
    last5 = {v: {s: last5_mean(c) for s, c in zip(seeds[v], curves[v], strict=True)}
             for v in variants}
    lead = convergence.baseline(methods)
    target = (TARGET_SHARE * statistics.median(last5[lead].values()) if lead in last5
              else float("nan"))
    extending = (f" (the table is being taken to {longest} rounds; every run is shown at the "
                 f"{rounds} all of them hold)" if longest > rounds else "")
    lines = [f"## {setting}", "",
             f"{rounds} rounds{extending}; target {target:.3f} (95% of tuned {lead}'s, median "
             f"over seeds). Accuracy: mean over seeds of each run's mean over its last 5 rounds, "
             f"[95% interval]; FedHPro - method in points, paired by seed (the seeds both ran; "
             f"a published recipe against FedHPro's published one); W / T / L: FedHPro ahead / "
             f"no difference / behind, by whether that interval excludes 0.", "",
             "| method | seeds | accuracy | best | rounds to target | MB to target | "
             "client s/round | FedHPro - method | W/T/L |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        own = seeds[variant]
        runs = curves[variant]
        reached = [r for r in (to_target(c, target) for c in runs) if r is not None]
        rounds_cell = (f"{stats.mean([r for r, _ in reached]):.1f} ({len(reached)}/"
                       f"{len(own)})" if reached else f"— (0/{len(own)})")
        mb_cell = f"{stats.mean([mb for _, mb in reached]):.1f}" if reached else "—"
        best = stats.mean([max(row["accuracy"] for row in c) for c in runs])
        client = stats.mean([float(by_variant[variant][s]["client_seconds"]) for s in own])
        against = published_name(METHOD) if variant in published else METHOD
        diff_cell, verdict = (("—", "—") if variant == against
                              else stats.paired_text(last5.get(against, {}), last5[variant]))
        name = f"**{variant}**" if variant == against else variant
        accuracy = stats.interval_text(list(last5[variant].values()))
        lines.append(f"| {name} | {len(own)} | {accuracy} | "
                     f"{best:.3f} | {rounds_cell} | {mb_cell} | {client:.2f} | {diff_cell} | "
                     f"{verdict} |")
    lines += ["", *tuned_against_published(last5),
              *convergence_lines({m: full[m] for m in tuned}, longest),
              *collapses(last5, loaded, curves, loaded[variants[0]][0]["num_classes"]),
              f"![{setting}](plots/{setting}-seeds.png)", ""]
    plot_seeds(out, setting, {m: full[m] for m in tuned})
    return lines


def tuned_against_published(last5: dict[str, dict[int, float]]) -> list[str]:
    """Tuned FedHPro minus FedHPro as its authors published it, paired by seed: what the
    tuning and this implementation's defaults buy over the reference recipe."""
    published = published_name(METHOD)
    if METHOD not in last5 or published not in last5:
        return []
    diff, verdict = stats.paired_text(last5[METHOD], last5[published])
    return [f"Tuned FedHPro against its published recipe, paired by seed (the seeds both ran): "
            f"{diff} points, {verdict}.", ""]


def convergence_lines(curves: dict[str, list[list[dict[str, Any]]]], rounds: int) -> list[str]:
    """The 5-round mean's change over the last 10 rounds of each tuned method's mean curve;
    the setting counts as converged when its baseline's (`convergence`) is under the rule's."""
    changes = {method: 100 * convergence.moving_change(convergence.mean_curve(runs))
               for method, runs in curves.items()
               if convergence.checkable(convergence.mean_curve(runs))}
    lead = convergence.baseline(list(curves))
    if lead not in changes:
        return ["Convergence: too few rounds to check.", ""]
    holds = convergence.flattened(convergence.mean_curve(curves[lead]))
    verdict = "converged" if holds else "NOT converged"
    cells = ", ".join(f"{m} {c:+.2f}" for m, c in changes.items())
    return [f"Convergence on the test curves, mean over seeds: {lead}'s 5-round mean moved "
            f"{changes[lead]:+.2f} points over the last 10 of {rounds} rounds ({verdict}: the "
            f"criterion is under {convergence.CONVERGED_POINTS}; the length was set by the "
            f"same rule on {lead}'s validation re-check, up to the setting's cap); the "
            f"others: {cells}.", ""]


def collapses(last5: dict[str, dict[int, float]], loaded: dict[str, list[dict[str, Any]]],
              curves: dict[str, list[list[dict[str, Any]]]], num_classes: int) -> list[str]:
    """Every table run that collapsed (`stability.collapse` on its test curve: diverged, never
    left chance, or fell back), named with its seed and cause, not averaged away."""
    found = []
    for variant, scores in last5.items():
        for seed, results, curve in zip(scores, loaded[variant], curves[variant], strict=True):
            cause = collapse([row["accuracy"] for row in curve], num_classes,
                             results.get("diverged_round"))
            if cause:
                found.append(f"{variant} seed {seed} ({cause}; last 5 {scores[seed]:.3f})")
    if not found:
        return ["Collapsed runs: none.", ""]
    return [f"Collapsed runs (a diverged one stops there and its last accuracy stands for the "
            f"rounds left, so it stays in its row's mean): {'; '.join(found)}. Their curves "
            f"are in the plot.", ""]


def plot_seeds(out: Path, setting: str, curves: dict[str, list[list[dict[str, Any]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (method, runs) in enumerate(curves.items()):
        colour = f"C{i}"
        for run in runs:
            ax.plot([r["round"] for r in run], [r["accuracy"] for r in run], color=colour,
                    alpha=0.25, linewidth=0.8)
        curve = convergence.mean_curve(runs)
        ax.plot(range(1, len(curve) + 1), curve, color=colour, linewidth=2,
                label=method)
    ax.set(xlabel="round", ylabel="test accuracy", title=f"{setting}: every seed (thin), mean")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    (out / "plots").mkdir(exist_ok=True)
    fig.savefig(out / "plots" / f"{setting}-seeds.png", dpi=110)
    plt.close(fig)


def trials_table(records: dict[str, Any]) -> list[str]:
    """TRIALS.md: every trial's keys and score at every rung it reached (a collapsed one
    marked), the re-checks at full length with their causes, the winner marked."""
    lines = ["# Tuning trials", "",
             "Scores: mean validation accuracy over a trial's last 5 rounds at each rung of "
             "successive halving (every trial for a quarter of the rounds, then the best "
             f"{FINALISTS} to half of them; ✗ collapsed at that rung). Then each method's "
             "candidates in rank order are re-checked at the table's full length on a second "
             "seed: the first that does not collapse is the method's recipe.", ""]
    for setting, record in records.items():
        lines += [f"## {setting} (seed {record['seed']}, re-check seed {record['recheck_seed']}"
                  f", the table {record['length']} rounds)", "",
                  "| trial | keys | " + " | ".join(f"{r['rounds']} rounds"
                                                  for r in record["rungs"])
                  + " | re-check | |",
                  "|---|---|" + "---|" * (len(record["rungs"]) + 2)]
        for method, overrides in record["chosen"].items():
            checks = {c["trial"]: c for c in record["rechecks"].get(method, [])}
            for trial in trials(method, record["budget"]):
                cells = [(f"{r['scores'][trial.name]:.4f}"
                          + (" ✗" if trial.name in r.get("collapsed", {}) else ""))
                         if trial.name in r["scores"] else "" for r in record["rungs"]]
                check = checks.get(trial.name)
                cells.append("" if check is None else
                             f"{check['score']:.4f} at {check['rounds']}"
                             + (f": {check['collapse']}" if check["collapse"] else ""))
                mark = "**chosen**" if trial.overrides == overrides else ""
                if mark and method in record["unstable"]:
                    mark = "**chosen, unstable** (every candidate collapsed)"
                lines.append(f"| {trial.name} | `{trial.overrides}` | "
                             + " | ".join(cells) + f" | {mark} |")
        lines.append("")
    return lines


def write_protocol_report(out: Path, command: str) -> Path:
    with open(out / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] in SCORED]
    records = json.loads((out / "tuning" / "trials.json").read_text())
    (out / "tuning" / "TRIALS.md").write_text("\n".join(trials_table(records)))
    chosen = read_chosen(out / "tuning" / "chosen.yaml")
    plan = read_plan(out)
    lines = ["# The comparison protocol", "",
             f"- command: `{command}`", f"- machine: {machine()}",
             f"- date: {datetime.date.today().isoformat()}", "",
             "Every method was tuned on a validation share (10% of the training pool, "
             f"stratified, seeded; never the test set) with the same budget: {plan['trials']} "
             "trials of local learning rate x momentum x the method's own knob, by successive "
             "halving on one seed; then its candidates, in rank order, re-checked at the "
             "table's full length on a second seed, the first that neither diverged, stayed "
             "at chance nor fell back being its recipe; the baseline's re-check also set the "
             "table's length, grown until its validation curve flattened "
             "([trials](tuning/TRIALS.md), [chosen keys](tuning/chosen.yaml); "
             "docs/benchmarking.md). The table runs each tuned recipe on "
             f"{len(plan['seeds'])} other seeds and each authors' published recipe on "
             f"{len(plan['published_seeds'])} of them; every run holds the validation share "
             "out. Accuracy is on the test set (heterogeneous clients: each client's own model "
             "on its own test split, averaged).", "",
             "Published recipes (optimiser and the method's keys; rounds, local epochs and "
             "batch are the setting's): "
             + "; ".join(f"{m}: `{PUBLISHED[m]}`" for m in
                         dict.fromkeys(m for ms in plan["settings"].values() for m in ms))
             + ".", ""]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    missing = [name for name in plan["settings"] if name not in settings]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)} (a table's seeds column shows what a "
                  f"row holds so far).", ""]
    for setting in settings:
        srows = [r for r in rows if r["setting"] == setting]
        lines += setting_section(out, setting, srows, list(chosen.get(setting, {})))
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    """RESULTS.md from what a protocol folder holds so far, without running anything."""
    parser = argparse.ArgumentParser(prog="python -m fedhpro_lab.protocol_report",
                                     description=main.__doc__)
    parser.add_argument("out", type=Path, help="the folder of `fedhpro-bench --protocol --out`")
    parser.add_argument("--command", default="fedhpro-bench --protocol --out OUT",
                        help="the command that made the runs, for RESULTS.md")
    args = parser.parse_args(argv)
    archive.unpack(args.out.resolve())  # a fresh clone holds the runs packed
    print(write_protocol_report(args.out.resolve(), args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
