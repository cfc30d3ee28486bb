"""`fedhpro-data`: what each client of an experiment holds, before running it.

Prints the samples per class of every client (and of the server's held-out set) for a YAML
experiment, and can save the same table as a PNG heat map. With more than `MAX_COLUMNS`
classes the table is summarised (per client: samples, classes held, largest class; per class:
the counts at every tenth class) and the heat map drops the numbers in its cells:

    fedhpro-data --config conf/default.yaml --png clients.png
    python -m fedhpro_lab.datasummary --config conf/mnist-lt.yaml --overrides "seed=1"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fedhpro_flwr.config import ConfigError, ExperimentConfig, parse_overrides
from fedhpro_flwr.data.federated import client_data, held_out_data
from fedhpro_flwr.methods import load_experiment


def client_class_counts(cfg: ExperimentConfig) -> np.ndarray:
    """(clients, classes) samples per class of every client's training data."""
    return np.stack([client_data(cfg, i).class_counts().numpy()
                     for i in range(cfg.partition.num_partitions)])


def client_domain_counts(cfg: ExperimentConfig) -> np.ndarray:
    """(clients, domains) samples per domain; (clients, 0) for single-domain data."""
    return np.stack([client_data(cfg, i).domain_counts().numpy()
                     for i in range(cfg.partition.num_partitions)])


MAX_COLUMNS = 20  # class tables wider than this are summarised (glyphs-100, CIFAR-100, ...)


def _aligned(rows: list[list[str]], rules: tuple[int, ...]) -> str:
    """Right-aligned columns, a rule line before each row index in `rules`."""
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    for at in sorted(rules, reverse=True):
        lines.insert(at, "-" * len(lines[0]))
    return "\n".join(lines)


def format_counts(counts: np.ndarray, test_counts: np.ndarray, columns: list[str]) -> str:
    """A plain-text table: one row per client, one column per class (or domain), totals."""
    kinds = "classes" if columns[0] == "0" else "domains"
    rows = [["client", *columns, "total", kinds]]
    for i, row in enumerate(counts):
        rows.append([str(i), *map(str, row), str(row.sum()), str((row > 0).sum())])
    for name, row in (("all", counts.sum(axis=0)), ("test", test_counts)):
        rows.append([name, *map(str, row), str(row.sum()), str((row > 0).sum())])
    return _aligned(rows, (1, len(rows) - 2))


def format_many_classes(counts: np.ndarray, test_counts: np.ndarray) -> str:
    """Too many classes for one column each: per client its samples, the classes it holds
    and its largest class; then the samples per class of all clients and of the test set at
    eleven classes spread over the label range (the long tail's profile shows in it)."""
    rows = [["client", "samples", "classes", "largest class", "share"]]
    for name, row in [*((str(i), r) for i, r in enumerate(counts)),
                      ("all", counts.sum(axis=0)), ("test", test_counts)]:
        top = int(row.argmax())
        rows.append([name, str(row.sum()), str((row > 0).sum()), f"{top} ({row[top]})",
                     f"{row[top] / max(row.sum(), 1):.0%}"])
    picks = np.unique(np.linspace(0, counts.shape[1] - 1, 11).round().astype(int))
    profile = [["class", *map(str, picks)],
               ["all", *map(str, counts.sum(axis=0)[picks])],
               ["test", *map(str, test_counts[picks])]]
    return (_aligned(rows, (1, len(rows) - 2)) + "\n\nsamples per class, at every tenth "
            "class:\n" + _aligned(profile, (1,)))


def save_heatmap(tables: list[tuple[np.ndarray, str, list[str]]], path: Path,
                 title: str) -> Path:
    """Annotated heat maps side by side, one per (counts, x label, column names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = tables[0][0].shape[0]
    # room for a number in every cell, or 12 inches for a table too wide to hold them
    inches = [0.6 * c if c <= MAX_COLUMNS else 12.0 for c in (t[0].shape[1] for t in tables)]
    fig, axes = plt.subplots(1, len(tables), squeeze=False, width_ratios=inches,
                             figsize=(1.5 + sum(inches), 1.0 + 0.45 * clients))
    for ax, (counts, xlabel, names) in zip(axes[0], tables, strict=True):
        image = ax.imshow(counts, cmap="viridis", aspect="auto")
        many = len(names) > MAX_COLUMNS  # no numbers in the cells, a tick every tenth
        ticks = range(0, len(names), -(-len(names) // 10)) if many else range(len(names))
        for (i, j), value in () if many else np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                    color="white" if value < counts.max() / 2 else "black")
        ax.set(xlabel=xlabel, ylabel="client", xticks=ticks, yticks=range(clients))
        ax.set_xticklabels([names[t] for t in ticks],
                           rotation=45 if max(map(len, names)) > 2 else 0)
        fig.colorbar(image, ax=ax, label="samples")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedhpro-data", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/default.yaml", help="experiment YAML")
    parser.add_argument("--overrides", default="", help='dotted YAML keys, e.g. "seed=1"')
    parser.add_argument("--png", type=Path, help="also save the tables as heat maps here")
    args = parser.parse_args(argv)
    try:
        cfg = load_experiment(Path(args.config), parse_overrides(args.overrides))
        classes, domains = client_class_counts(cfg), client_domain_counts(cfg)
        test = held_out_data(cfg)
    except (ConfigError, ValueError) as exc:
        print(f"fedhpro-data: {exc}", file=sys.stderr)
        return 2
    p = cfg.partition
    title = f"{cfg.data.dataset}, {p.scheme}, {p.num_partitions} clients, seed {cfg.seed}"
    class_names = [str(c) for c in range(classes.shape[1])]
    tables = [(classes, "class", class_names)]
    print(title)
    test_classes = test.class_counts().numpy()
    print(format_counts(classes, test_classes, class_names) if len(class_names) <= MAX_COLUMNS
          else format_many_classes(classes, test_classes))
    if domains.shape[1]:
        print()
        print(format_counts(domains, test.domain_counts().numpy(), list(test.domains)))
        tables.append((domains, "domain", list(test.domains)))
    if args.png:
        print(f"heat map: {save_heatmap(tables, args.png, title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
