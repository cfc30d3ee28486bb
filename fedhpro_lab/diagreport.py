"""The diagnostics part of RESULTS.md: how each method's anchors behave, from results.json.

Reads the per-round diagnostics the runs recorded (see `diagnostics` and FedHPro's matching
and recalibration numbers), tabulates them per setting and strategy (mean ± sample std over
seeds, `stats.std`), and draws them per round, plus the 2-D embeddings the runs saved.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from fedhpro_lab import stats
from fedhpro_lab.suites import run_path

# (results.json key, column title, how a run's rows become one number)
COLUMNS = (
    ("consistency_mean", "consistency, last round", "last"),
    ("consistency_std", "its spread over clients", "last"),
    ("consistency_mean", "consistency, mean over rounds", "mean"),
    ("anchor_cosine_mean", "anchor cosine, last round", "last"),
    ("anchor_movement", "anchor movement per round", "mean"),
    ("hp_movement", "hyper-prototype movement per round", "mean"),
    ("hp_match_loss_before", "matching loss per class, before", "per-class"),
    ("hp_match_loss_after", "after", "per-class"),
)
PLOTTED = (("consistency_mean", "consistency with client prototypes"),
           ("anchor_cosine_mean", "mean cosine between class anchors"),
           ("anchor_movement", "anchor movement (relative)"),
           ("hp_movement", "hyper-prototype movement (relative)"))


def series(out: Path, setting: str, rows: list[dict[str, str]],
           key: str) -> dict[str, list[list[float]]]:
    """Per strategy, each seed's value of `key` per round (NaN where a round lacks it)."""
    found: dict[str, list[list[float]]] = {}
    for row in rows:
        path = run_path(out, setting, row["strategy"], row["seed"]) / "results.json"
        try:
            rounds = json.loads(path.read_text())["rounds"]
        except (OSError, ValueError, KeyError):
            continue
        found.setdefault(row["strategy"], []).append([float(r.get(key, math.nan))
                                                      for r in rounds])
    return found


def _summary(runs: list[list[float]], how: str, classes: int) -> tuple[float, float] | None:
    per_run = []
    for values in runs:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            continue
        if how == "last":
            per_run.append(finite[-1])
        elif how == "per-class":
            per_run.append(stats.mean(finite) / classes)
        else:
            per_run.append(stats.mean(finite))
    if not per_run:
        return None
    return stats.mean(per_run), stats.std(per_run)


def has_diagnostics(out: Path, rows: list[dict[str, str]]) -> bool:
    """Whether any run recorded anchor or hyper-prototype diagnostics."""
    for setting in {r["setting"] for r in rows}:
        srows = [r for r in rows if r["setting"] == setting]
        for key in ("anchor_cosine_mean", "hp_movement"):
            if any(math.isfinite(v) for runs in series(out, setting, srows, key).values()
                   for run in runs for v in run):
                return True
    return False


def table(out: Path, setting: str, rows: list[dict[str, str]], classes: int) -> list[str]:
    """One row per strategy, the COLUMNS that any of its runs recorded."""
    data = {key: series(out, setting, rows, key) for key, _, _ in COLUMNS}
    strategies = sorted({r["strategy"] for r in rows})
    cells: dict[str, list[str]] = {}
    shown = []
    for i, (key, _, how) in enumerate(COLUMNS):
        column = [_summary(data[key].get(s, []), how, classes) for s in strategies]
        if any(c is not None for c in column):
            shown.append(i)
            for s, c in zip(strategies, column, strict=True):
                cells.setdefault(s, []).append("-" if c is None else f"{c[0]:.3g} ± {c[1]:.2g}")
    titles = [COLUMNS[i][1] for i in shown]
    lines = ["| strategy | " + " | ".join(titles) + " |",
             "|---|" + "---|" * len(titles)]
    lines += [f"| {s} | " + " | ".join(cells.get(s, [])) + " |" for s in strategies]
    return lines


def first_rounds(out: Path, setting: str, rows: list[dict[str, str]],
                 count: int = 3) -> list[str]:
    """The recalibrated classifier against the FedAvg'd one it replaced, in the first rounds."""
    recal = series(out, setting, rows, "accuracy")
    averaged = series(out, setting, rows, "aggregated_head_accuracy")
    lines = []
    count = min([count, *(len(run) for runs in averaged.values() for run in runs)])
    for strategy, runs in sorted(averaged.items()):
        if not any(math.isfinite(v) for run in runs for v in run[:count]):
            continue
        cells = []
        for r in range(count):
            a = [run[r] for run in runs if len(run) > r]
            b = [run[r] for run in recal[strategy] if len(run) > r]
            cells.append(f"{stats.mean(a):.3f} → {stats.mean(b):.3f}")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    header = " | ".join(f"round {r + 1}" for r in range(count))
    return ["Accuracy with the FedAvg'd classifier → with the recalibrated one that replaces "
            "it (mean over seeds):", "", f"| strategy | {header} |",
            "|---|" + "---|" * count, *lines, ""]


def save_figure(fig: Any, title: str, path: Path, dpi: int) -> Path:
    """Title, lay out, write and close a figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_rounds(out: Path, setting: str, rows: list[dict[str, str]]) -> Path | None:
    """The PLOTTED diagnostics per round: mean over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(key, title, series(out, setting, rows, key)) for key, title in PLOTTED]
    # seeds may hold different numbers of rounds (a diverged run stops early)
    panels = [p for p in panels
              if any(math.isfinite(v) for runs in p[2].values() for run in runs for v in run)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (_, title, found) in zip(axes[0], panels, strict=True):
        for strategy, runs in sorted(found.items()):
            length = min(len(r) for r in runs)
            values = np.array([r[:length] for r in runs])
            if not np.isfinite(values).any():
                continue
            x = np.arange(1, length + 1)
            with warnings.catch_warnings():  # rounds without a value (e.g. round 1) stay gaps
                warnings.simplefilter("ignore", RuntimeWarning)
                ax.plot(x, np.nanmean(values, 0), label=strategy)
                ax.fill_between(x, np.nanmin(values, 0), np.nanmax(values, 0), alpha=0.15)
        ax.set(xlabel="round", title=title)
        if title.startswith(("anchor movement", "hyper-prototype")):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, setting, out / "plots" / f"{setting}-diagnostics.png", dpi=110)


def plot_embeddings(out: Path, setting: str, rows: list[dict[str, str]]) -> Path | None:
    """The saved 2-D embeddings of the lowest seed: one row per strategy, one column per
    round; points are test features coloured by class, stars the class anchors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = min((r["seed"] for r in rows), key=int, default=None)
    pictures: dict[str, list[dict[str, Any]]] = {}
    for strategy in sorted({r["strategy"] for r in rows}):
        found = sorted(run_path(out, setting, strategy, seed).glob("embedding-round*.json"),
                       key=lambda p: int(p.stem.removeprefix("embedding-round")))
        if found:
            pictures[strategy] = [json.loads(p.read_text()) for p in found]
    if not pictures:
        return None
    columns = max(len(p) for p in pictures.values())
    fig, axes = plt.subplots(len(pictures), columns, figsize=(3.4 * columns, 3.2 * len(pictures)),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for axes_row, (strategy, shots) in zip(axes, pictures.items(), strict=True):
        for ax, shot in zip(axes_row, shots, strict=False):
            x, y = zip(*shot["features"], strict=True)
            ax.scatter(x, y, s=4, c=[cmap(c % 10) for c in shot["labels"]], alpha=0.5)
            if shot["anchors"]:
                ax_, ay = zip(*shot["anchors"], strict=True)
                ax.scatter(ax_, ay, s=160, marker="*", edgecolors="black",
                           c=[cmap(c % 10) for c in shot["anchor_classes"]])
            ax.set_title(f"{strategy}, round {shot['round']}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    return save_figure(fig, f"{setting} (seed {seed}): PCA of normalised test features and "
                       "anchors", out / "plots" / f"{setting}-embeddings.png", dpi=100)


def diagnostics_section(out: Path, rows: list[dict[str, str]]) -> list[str]:
    """RESULTS.md's diagnostics: per setting a table, the first rounds of recalibration,
    the per-round plot and the embeddings; nothing when no run recorded diagnostics."""
    if not rows or not has_diagnostics(out, rows):
        return []
    lines = ["## Diagnostics of the anchors", "",
             "Anchors: FedHPro's (the mean of each class's normalised hyper-prototypes), "
             "FedProto's averaged prototypes, FedTGP's generated ones, FPL's unbiased ones. "
             "Consistency: each client's mean cosine between its class prototypes after local "
             "training and the anchors it was sent, averaged over clients (recorded with "
             "`diagnostics.consistency=true`); its spread is the std over clients. Anchor "
             "cosine: mean cosine between two classes' anchors (lower = more separated). "
             f"Movement: ||change|| / ||before|| per round. Each cell: mean ± {stats.STD_LABEL}.",
             ""]
    for setting in sorted({r["setting"] for r in rows}):
        srows = [r for r in rows if r["setting"] == setting]
        classes = _classes(out, setting, srows)
        lines += [f"### {setting}", "", *table(out, setting, srows, classes), "",
                  *first_rounds(out, setting, srows)]
        for path in (plot_rounds(out, setting, srows), plot_embeddings(out, setting, srows)):
            if path is not None:
                lines.append(f"![{path.stem}](plots/{path.name})")
        lines.append("")
    return lines


def _classes(out: Path, setting: str, rows: list[dict[str, str]]) -> int:
    """Classes reported by the first run that says (FedHPro's rows carry it), else 1."""
    for found in series(out, setting, rows, "classes_reported").values():
        for run in found:
            finite = [v for v in run if math.isfinite(v)]
            if finite:
                return max(int(max(finite)), 1)
    return 1
