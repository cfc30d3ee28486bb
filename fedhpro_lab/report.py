"""RESULTS.md and plots from a benchmark's results.csv (and its runs' results.json).

    python -m fedhpro_lab.report benchmarks/default-suite/results.csv [--command "how"]
    python -m fedhpro_lab.report benchmarks/default-suite/results.csv --against fedavg

Per setting: the strategies side by side (mean ± sample std over seeds, `stats.std`, the
best mean marked),
per-domain accuracies where the data has domains, and the plots (accuracy per round with a
band over seeds, per-domain bars, the time of a round split into client, server and
framework). Then the harness's goals, each marked met or not met with its measured value.
`--against STRATEGY` prints each setting's paired table against another strategy than FedHPro
instead (nothing is written).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

from fedhpro_lab import stats
from fedhpro_lab.benchmark import SCORED
from fedhpro_lab.diagreport import diagnostics_section, series
from fedhpro_lab.suites import ALL_STRATEGIES, FLOAT16

FINDINGS_NAME = "FINDINGS.md"
BASELINE = "fedavg"
METHOD = "fedhpro"


PAIRED_REFERENCE = "fedhpro"  # what a suite's variants are compared with, seed by seed


def _float(row: dict[str, str], key: str) -> float:
    return float(row[key]) if row.get(key) not in (None, "") else float("nan")


def _stats(values: list[float]) -> tuple[float, float]:
    return stats.mean(values), stats.std(values)


def _by(rows: list[dict[str, str]], *keys: str) -> dict[tuple[str, ...], list[dict[str, str]]]:
    groups: dict[tuple[str, ...], list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return groups


def peak_mb(rows: list[dict[str, str]]) -> float | None:
    """The highest peak memory of the runs that measured it (a run read back from its
    results.json by a resumed bench did not: its row holds nan); None if none did."""
    peaks = [p for p in (_float(r, "peak_rss_mb") for r in rows) if not math.isnan(p)]
    return max(peaks) if peaks else None


def memory_note(rows: list[dict[str, str]]) -> str:
    peak = peak_mb(rows)
    return f" Peak memory of a run's processes: {peak:.0f} MB." if peak is not None else ""


def balanced_client_seconds(row: dict[str, str]) -> float:
    """A round's client time on its clock if the workers had been perfectly balanced: what
    runs recorded before clients stamped their start give instead of client_busy_seconds."""
    return _float(row, "client_seconds") / _float(row, "workers")


def cpu_name() -> str:
    """The CPU's model: timings from two machines of the same size can differ by a third."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    import torch

    try:
        import flwr

        flwr_version = flwr.__version__
    except (ImportError, AttributeError):
        flwr_version = "?"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} {platform.system()}, {cpu_name()}, {os.cpu_count()} CPU cores, "
            f"{gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"flwr {flwr_version}")


def setting_table(rows: list[dict[str, str]]) -> list[str]:
    """Markdown rows: one per strategy, means ± sample std over seeds, the best final mean in
    bold."""
    by_strategy = _by(rows, "strategy")
    finals = {s: _stats([_float(r, "final_accuracy") for r in rs])[0]
              for (s,), rs in by_strategy.items()}
    best = max(finals, key=finals.__getitem__)
    lines = [f"Each cell: mean ± {stats.STD_LABEL}.", "",
             "| strategy | seeds | final accuracy | best accuracy | mean of last 5 | s / round "
             "| client s / round (sum) | clients busy s / round | server s / round "
             "| framework s / round | MB up / round | MB down / round |", "|" + "---|" * 12]
    for (strategy,), rs in sorted(by_strategy.items(), key=lambda kv: -finals[kv[0][0]]):
        def cell(key: str, scale: float = 1.0, digits: int = 4, rs=rs) -> str:
            mean, std = _stats([_float(r, key) * scale for r in rs])
            return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(rs) > 1 else f"{mean:.{digits}f}"

        name = f"**{strategy}**" if strategy == best else strategy
        final = cell("final_accuracy")
        lines.append(
            f"| {name} | {len(rs)} | {'**' + final + '**' if strategy == best else final} "
            f"| {cell('best_accuracy')} | {cell('mean_last5_accuracy')} "
            f"| {cell('wall_seconds', digits=2)} | {cell('client_seconds', digits=2)} "
            f"| {cell('client_busy_seconds', digits=2)} | {cell('server_seconds', digits=3)} "
            f"| {cell('framework_seconds', digits=2)} "
            f"| {cell('bytes_up_per_round', 1e-6, 3)} | {cell('bytes_down_per_round', 1e-6, 3)} |")
    return lines


def paired_table(rows: list[dict[str, str]], reference: str) -> list[str]:
    """Markdown rows: each variant's mean of the last 5 rounds with its 95% interval, and
    its difference to `reference` paired by seed (the seeds both ran) with W / T / L (the
    variant ahead / no difference / behind). Empty when the reference has under 2 seeds."""
    last5 = {s: {int(r["seed"]): _float(r, "mean_last5_accuracy") for r in rs}
             for (s,), rs in _by(rows, "strategy").items()}
    if len(last5.get(reference, {})) < 2:
        return []
    lines = ["Mean of each run's last 5 rounds over seeds [95% t interval]; the variant minus "
             f"{reference} in points, paired by seed [95% interval]; W / T / L: the variant "
             "ahead / no difference / behind, by whether that interval excludes 0.", "",
             f"| variant | seeds | mean of last 5 | minus {reference} | W/T/L |",
             "|---|---|---|---|---|"]
    for variant, runs in sorted(last5.items(), key=lambda kv: -stats.mean(kv[1].values())):
        values = list(runs.values())
        cell = stats.interval_text(values) if len(values) > 1 else f"{values[0]:.3f}"
        diff, verdict = (("—", "—") if variant == reference
                         else stats.paired_text(runs, last5[reference]))
        lines.append(f"| {variant} | {len(values)} | {cell} | {diff} | {verdict} |")
    return lines


def client_spread_table(rows: list[dict[str, str]]) -> list[str]:
    lines = ["| strategy | std over clients | worst client |", "|---|---|---|"]
    for (strategy,), rs in sorted(_by(rows, "strategy").items()):
        std = _stats([_float(r, "client_accuracy_std") for r in rs])[0]
        worst = _stats([_float(r, "client_accuracy_min") for r in rs])[0]
        lines.append(f"| {strategy} | {std:.4f} | {worst:.4f} |")
    return lines


def domain_columns(rows: list[dict[str, str]]) -> list[str]:
    return [k for k in rows[0] if k.startswith("accuracy_") and any(r.get(k) for r in rows)]


def domain_table(rows: list[dict[str, str]], columns: list[str]) -> list[str]:
    names = [c.removeprefix("accuracy_") for c in columns]
    lines = ["| strategy | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for (strategy,), rs in sorted(_by(rows, "strategy").items()):
        cells = [f"{_stats([_float(r, c) for r in rs])[0]:.4f}" for c in columns]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return lines


def plot_setting(out: Path, setting: str, rows: list[dict[str, str]],
                 domains: list[str]) -> list[Path]:
    """accuracy per round (mean, band = min..max over seeds), per-domain bars, time split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, runs in sorted(series(out, setting, rows, "accuracy").items()):
        length = min(len(r) for r in runs)
        acc = np.array([r[:length] for r in runs])
        x = np.arange(1, length + 1)
        ax.plot(x, acc.mean(0), label=strategy, lw=2 if strategy == METHOD else 1)
        ax.fill_between(x, acc.min(0), acc.max(0), alpha=0.15)
    ax.set(xlabel="round", ylabel="test accuracy", title=f"{setting}: accuracy per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(plots / f"{setting}-accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    strategies = sorted({r["strategy"] for r in rows})
    by_strategy = _by(rows, "strategy")
    if domains:
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(domains) * len(strategies) / 3, 4))
        width = 0.8 / len(strategies)
        for i, strategy in enumerate(strategies):
            means = [_stats([_float(r, d) for r in by_strategy[(strategy,)]])[0]
                     for d in domains]
            ax.bar(np.arange(len(domains)) + i * width, means, width, label=strategy)
        ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2,
                      [d.removeprefix("accuracy_") for d in domains])
        ax.set(ylabel="final test accuracy", title=f"{setting}: accuracy per domain")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(plots / f"{setting}-domains.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = np.zeros(len(strategies))
    for key, label in (("client_busy_seconds", "clients training"),
                       ("server_seconds", "server step"), ("framework_seconds", "framework")):
        values = [stats.mean(_float(r, key) for r in by_strategy[(s,)])
                  for s in strategies]
        ax.bar(strategies, values, bottom=bottom, label=label)
        bottom += np.array(values)
    ax.set(ylabel="seconds per round", title=f"{setting}: where a round's time goes")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30)
    fig.tight_layout()
    paths.append(plots / f"{setting}-time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _mark(met: bool) -> str:
    return "met" if met else "**not met**"


def scale_goals(ok: list[dict[str, str]], scaling: list[dict[str, str]]) -> list[str]:
    """Memory with 100 clients against the same data on 10; server step against classes."""
    lines = []
    big = peak_mb([r for r in ok if r["suite"] == "scale"])
    small = peak_mb([r for r in ok if r["suite"] != "scale" and r["setting"] == "mnist-dir0.5"])
    if big is not None and small is not None:
        lines.append(f"| 100 clients, 10% sampled per round: memory bounded (peak of the run's "
                     f"processes at most 1.25x the 10-client peak) | {big:.0f} MB vs {small:.0f} "
                     f"MB ({big / small:.2f}x) | {_mark(big <= 1.25 * small)} |")
    if len(scaling) >= 2:
        # from 100 classes on, where the paper's many-class settings start (fewer classes fit
        # the groups and neighbourhoods of the linear variant whole)
        first = next((r for r in scaling[:-1] if int(r["classes"]) >= 100), scaling[0])
        last = scaling[-1]
        classes = float(last["classes"]) / float(first["classes"])
        for key, how in SCALING_VARIANTS:
            if key not in first:  # a CSV written before the variant existed
                continue
            grows = _float(last, key) / _float(first, key)
            lines.append(f"| FedHPro's server step{how} grows no worse than linearly in the "
                         f"classes ({first['classes']} -> {last['classes']}) | {grows:.1f}x the "
                         f"time for {classes:.0f}x the classes | {_mark(grows <= 1.1 * classes)} |")
    return lines


def goals(ok: list[dict[str, str]]) -> list[str]:
    """Each goal measured by the suites' runs, met or not met, with the measured value."""
    lines = ["| goal | measured | met |", "|---|---|---|"]
    mark = _mark
    ok = [r for r in ok if r["suite"] != "scale"]
    for (setting,), rows in sorted(_by(ok, "setting").items()):
        finals = {s: _stats([_float(r, "final_accuracy") for r in rs])[0]
                  for (s,), rs in _by(rows, "strategy").items()}
        baselines = [s for s in finals if s != METHOD and s in ALL_STRATEGIES]  # not ablations
        if METHOD not in finals or not baselines:
            continue
        rival = max(baselines, key=finals.__getitem__)
        lines.append(f"| {setting}: FedHPro ahead of every baseline (mean final accuracy) "
                     f"| {METHOD} {finals[METHOD]:.4f} vs best baseline {rival} "
                     f"{finals[rival]:.4f} | {mark(finals[METHOD] > finals[rival])} |")

    def mean_ratio(num: str, den: str, rows: list[dict[str, str]]) -> float:
        return stats.mean(_float(r, num) / _float(r, den) for r in rows)

    if ok:
        share = mean_ratio("framework_seconds", "wall_seconds", ok)
        balanced = stats.mean(
            max(_float(r, "wall_seconds") - _float(r, "server_seconds")
                - balanced_client_seconds(r), 0.0) / _float(r, "wall_seconds") for r in ok)
        lines.append(f"| framework overhead < 10% of a round (all runs) | {share:.1%} (counting "
                     f"idle workers as overhead, i.e. clients assumed perfectly balanced: "
                     f"{balanced:.1%}) | {mark(share < 0.10)} |")
    method = [r for r in ok if r["strategy"] == METHOD]
    if method:
        share = mean_ratio("server_seconds", "wall_seconds", method)
        lines.append(f"| FedHPro's server step < 5% of a round | {share:.1%} "
                     f"| {mark(share < 0.05)} |")
    pairs = _by(ok, "setting", "seed")
    for variant in (METHOD, FLOAT16.name):
        client: list[float] = []
        up: dict[str, list[float]] = defaultdict(list)
        for (setting, _), rows in pairs.items():
            named = {r["strategy"]: r for r in rows}
            if variant in named and BASELINE in named:
                client.append(_float(named[variant], "client_seconds")
                              / _float(named[BASELINE], "client_seconds"))
                up[setting].append(_float(named[variant], "bytes_up_per_round")
                                   / _float(named[BASELINE], "bytes_up_per_round"))
        if not client:
            continue
        time_ratio = stats.mean(client)
        # Bytes do not vary by chance, so every setting must meet the goal, not their mean.
        byte_ratio = stats.mean(r for rs in up.values() for r in rs)
        per_setting = {setting: stats.mean(rs) for setting, rs in up.items()}
        worst = max(per_setting, key=per_setting.__getitem__)
        worst_ratio = per_setting[worst]
        who = "FedHPro's" if variant == METHOD else f"{variant}'s"
        if variant == METHOD:
            lines.append(f"| {who} client time <= 1.25x FedAvg's (same epochs) "
                         f"| {time_ratio:.2f}x | {mark(time_ratio <= 1.25)} |")
        lines.append(f"| {who} bytes up per round <= 1.1x FedAvg's (every setting) "
                     f"| {byte_ratio:.3f}x (most: {worst} {worst_ratio:.3f}x) "
                     f"| {mark(worst_ratio <= 1.1)} |")
    return lines


# server_scaling.csv's variants: column suffix, how the report names it
SCALING_VARIANTS = (("server_seconds_gradients", " (recalibration from classifier gradients)"),
                    ("server_seconds_moments", " (fedhpro.recal_source=moments recal_solver=sgd)"),
                    ("server_seconds_full_softmax", " (fedhpro.recal_classes_per_step=0 "
                     "hp_softmax_classes=0: every class in every step)"),
                    ("server_seconds_moments_full_batch", " (as configured: class moments, "
                     "full-batch steps on groups of 32 classes, matching over 32 nearest)"),
                    ("server_seconds_no_recal", " (fedhpro.recalibration=false)"))


# server_scaling.csv's uploads: column suffix, how the plot names it
SCALING_UPLOADS = (("gradients", "classifier gradients"),
                   ("gradients_fp16", "classifier gradients, float16"),
                   ("moments", "class moments"), ("no_recal", "no recalibration"))


def upload_ratio(row: dict[str, str], key: str) -> float:
    """A client's upload (weights and the variant's statistics) against FedAvg's (weights)."""
    weights = _float(row, "weights_bytes")
    return (weights + _float(row, f"upload_bytes_{key}")) / weights


def scaling_table(scaling: list[dict[str, str]]) -> list[str]:
    """Server step and a client's upload per number of classes, for each recalibration."""
    lines = ["| classes | server step (s): classifier gradients | class moments "
             "| class moments, full-batch, every class "
             "| as configured (groups of 32 classes) | no recalibration "
             "| upload / FedAvg's: classifier gradients | their float16 | class moments "
             "| no recalibration |",
             "|" + "---|" * 10]
    for r in scaling:
        steps = " | ".join(f"{_float(r, key):.3f}" if key in r else "—"
                           for key, _ in SCALING_VARIANTS)
        uploads = " | ".join(f"{upload_ratio(r, key):.3f}x" for key, _ in SCALING_UPLOADS)
        lines.append(f"| {r['classes']} | {steps} | {uploads} |")
    return lines


def plot_scaling(out: Path, scaling: list[dict[str, str]]) -> Path:
    """Server step and a client's upload against the classes, log-log, with a line of slope
    one through each curve's first point: a curve steeper than it grows faster than C."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [int(r["classes"]) for r in scaling]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in SCALING_VARIANTS:
        if all(key in r and r[key] for r in scaling):
            seconds = [_float(r, key) for r in scaling]
            line, = left.plot(classes, seconds, "o-", label=label.strip(" ()"))
            left.plot(classes, [seconds[0] * c / classes[0] for c in classes], ":",
                      color=line.get_color(), lw=1)
    for key, label in SCALING_UPLOADS:
        right.plot(classes, [upload_ratio(r, key) for r in scaling], "o-", label=label)
    left.set(xscale="log", yscale="log", xlabel="classes",
             ylabel="server step (s, one thread)",
             title="FedHPro's server step (dotted: linear in C)")
    right.set(xscale="log", yscale="log", xlabel="classes", ylabel="upload / FedAvg's",
              title="a client's upload per round")
    for ax in (left, right):  # below the axes: the curves fill them
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    path = out / "plots" / "server-scaling.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(csv_path: Path, command: str) -> Path:
    """RESULTS.md (and plots/) next to results.csv."""
    out = csv_path.parent
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r["status"] in SCORED]  # with the diverged runs, listed below
    for r in ok:
        if not r.get("client_busy_seconds"):
            r["client_busy_seconds"] = str(balanced_client_seconds(r))
    failed = [r for r in rows if r["status"] not in SCORED]
    diverged = [r for r in rows if r["status"] == "diverged"]
    suites = sorted({r["suite"] for r in rows})
    lines = [f"# Benchmark results: suite {', '.join(suites)}", "",
             f"- command: `{command}`",
             f"- machine: {machine()}",
             f"- date: {datetime.date.today().isoformat()}",
             f"- runs: {len(ok) - len(diverged)} ok, {len(diverged)} diverged, "
             f"{len(failed)} failed", "",
             "Accuracy is the global model's on the server's test set (with heterogeneous clients: "
             "each client's own model on its own test split, averaged); times are means per round "
             "from round 2 on (round 1 also starts the engine; client = the sum over the round's "
             "clients; clients busy = the part of the round in which at least one client was "
             "training; framework = round wall time minus the server step minus that, the time "
             f"in which nothing computes); ± is the {stats.STD_LABEL}.", ""]
    for (setting,), srows in _by(ok, "setting").items():
        domains = domain_columns(srows)
        rounds = srows[0]["rounds"]
        memory = memory_note(srows)
        lines += [f"## {setting}", "", f"Suite {srows[0]['suite']}, {rounds} rounds.{memory}",
                  "", *setting_table(srows), ""]
        paired = paired_table(srows, PAIRED_REFERENCE)
        if paired:
            lines += [*paired, ""]
        if domains:
            lines += ["Final accuracy per domain (mean over seeds):", "",
                      *domain_table(srows, domains), ""]
        if any(r.get("client_accuracy_std") for r in srows):
            lines += ["Heterogeneous clients: accuracy is personalised (each client's own model "
                      "on its own test split, averaged over clients). Across clients, last "
                      "round (mean over seeds):", "", *client_spread_table(srows), ""]
        for path in plot_setting(out, setting, srows, domains):
            lines.append(f"![{path.stem}](plots/{path.name})")
        lines.append("")
    scaling_path = out / "server_scaling.csv"
    scaling = []
    if scaling_path.is_file():
        with open(scaling_path, newline="") as f:
            scaling = list(csv.DictReader(f))
        lines += ["## Server step and upload against the number of classes", "",
                  "`fedhpro-bench measure server-scaling --classes "
                  f"{' '.join(r['classes'] for r in scaling)} --csv DIR/{scaling_path.name}` "
                  "(DIR: this report's folder; one thread, "
                  "10 clients holding every class, d = 128); a client's upload against FedAvg's "
                  "(its weights alone):", "", *scaling_table(scaling), "",
                  f"![server-scaling](plots/{plot_scaling(out, scaling).name})", ""]
    lines += diagnostics_section(out, ok)
    lines += ["## Goals", "", *goals(ok), *scale_goals(ok, scaling), ""]
    for title, listed in (("Diverged runs (in the tables, scored at their last accuracy)",
                            diverged), ("Failed runs", failed)):
        if listed:
            lines += [f"## {title}", "", "| setting | strategy | seed | reason |",
                      "|---|---|---|---|"]
            lines += [f"| {r['setting']} | {r['strategy']} | {r['seed']} | {r['reason']} |"
                      for r in listed]
            lines.append("")
    findings = out / FINDINGS_NAME
    if findings.is_file():  # written by hand from these numbers; kept across regenerations
        lines += [findings.read_text().strip(), ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedhpro_lab.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("results_csv", type=Path)
    parser.add_argument("--command", help="how the results were made, for RESULTS.md")
    parser.add_argument("--against", metavar="STRATEGY",
                        help="print the paired tables against this strategy; write nothing")
    args = parser.parse_args(argv)
    if args.against:
        with open(args.results_csv, newline="") as f:
            ok = [r for r in csv.DictReader(f) if r["status"] in SCORED]
        for (setting,), srows in _by(ok, "setting").items():
            table = paired_table(srows, args.against) or [
                f"({args.against} has under 2 seeds here)"]
            print("\n".join([f"## {setting}", "", *table, ""]))
        return 0
    command = args.command or f"python -m fedhpro_lab.report {args.results_csv}"
    print(write_report(args.results_csv, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

