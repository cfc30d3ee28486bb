"""`fedhpro-data`: what each client of an experiment holds, before running it.

Prints the samples per class of every client (and of the server's held-out set) for a YAML
experiment, and can save the same table as a PNG heat map:

    fedhpro-data --config conf/default.yaml --png clients.png
    python -m fedhpro_flwr.datasummary --config conf/mnist-lt.yaml --overrides "seed=1"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .config import ConfigError, ExperimentConfig, load_experiment, parse_overrides
from .data import client_data, held_out_data


def client_class_counts(cfg: ExperimentConfig) -> np.ndarray:
    """(clients, classes) samples per class of every client's training data."""
    return np.stack([client_data(cfg, i).class_counts().numpy()
                     for i in range(cfg.partition.num_partitions)])


def format_counts(counts: np.ndarray, test_counts: np.ndarray) -> str:
    """A plain-text table: one row per client, one column per class, totals at the ends."""
    num_classes = counts.shape[1]
    rows = [["client", *map(str, range(num_classes)), "total", "classes"]]
    for i, row in enumerate(counts):
        rows.append([str(i), *map(str, row), str(row.sum()), str((row > 0).sum())])
    total = counts.sum(axis=0)
    rows.append(["all", *map(str, total), str(total.sum()), str((total > 0).sum())])
    rows.append(["test", *map(str, test_counts), str(test_counts.sum()),
                 str((test_counts > 0).sum())])
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 2, "-" * len(lines[0]))
    return "\n".join(lines)


def save_heatmap(counts: np.ndarray, path: Path, title: str) -> Path:
    """The client x class counts as an annotated heat map (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients, classes = counts.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * classes, 1.0 + 0.45 * clients))
    image = ax.imshow(counts, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                color="white" if value < counts.max() / 2 else "black")
    ax.set(xlabel="class", ylabel="client", title=title, xticks=range(classes),
           yticks=range(clients))
    fig.colorbar(image, ax=ax, label="samples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedhpro-data", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/default.yaml", help="experiment YAML")
    parser.add_argument("--overrides", default="", help='dotted YAML keys, e.g. "seed=1"')
    parser.add_argument("--png", type=Path, help="also save the table as a heat map here")
    args = parser.parse_args(argv)
    try:
        cfg = load_experiment(Path(args.config), parse_overrides(args.overrides))
        counts = client_class_counts(cfg)
    except (ConfigError, ValueError) as exc:
        print(f"fedhpro-data: {exc}", file=sys.stderr)
        return 2
    p = cfg.partition
    title = (f"{cfg.data.dataset}, {p.scheme}, {p.num_partitions} clients, seed {cfg.seed}")
    print(title)
    print(format_counts(counts, held_out_data(cfg).class_counts().numpy()))
    if args.png:
        print(f"heat map: {save_heatmap(counts, args.png, title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
