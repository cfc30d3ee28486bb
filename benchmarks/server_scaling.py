"""FedHPro's server step as the number of classes grows, and what a client uploads.

    python benchmarks/server_scaling.py [--classes 10 100 400] [--clients 10] [--repeats 3]
                                        [--csv benchmarks/server_scaling.csv]

For each number of classes C, builds the FedHPro Strategy for a d = 128 model, feeds it the
replies of `--clients` clients that each hold every class (random per-class statistics of the
real shapes, sent through the real encoder and decoder), and times `server_step` with one
thread: as configured (classifier recalibration + hyper-prototype matching, the default steps)
and with `fedhpro.recalibration=false` (matching only; clients then send no classifier
gradients). Also prints the bytes one client uploads per round: the model weights (a CNN whose
classifier has C outputs) and the per-class gradients, in float32 and with
`fedhpro.float16_upload`, with and without the classifier gradients.
Run it on an otherwise idle machine. With --csv the rows are also written there, where
`fedhpro_lab.report` picks them up (next to results.csv).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from fedhpro_flwr.algorithms.extraction import ClassStatistics
from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.data.federated import DataSpec
from fedhpro_flwr.methods import get_method, parse_experiment
from fedhpro_flwr.methods.payload import (
    decode_class_statistics,
    encode_class_statistics,
    record_nbytes,
    tensors_to_record,
)
from fedhpro_flwr.methods.strategy import ClientReply

D = 128


def random_statistics(num_classes: int, generator: torch.Generator) -> ClassStatistics:
    c = num_classes
    return ClassStatistics(torch.ones(c, dtype=torch.bool), torch.full((c,), 50),
                           torch.randn(c, D, generator=generator) * 0.01,
                           torch.randn(c, c, D, generator=generator) * 0.01,
                           torch.randn(c, c, generator=generator) * 0.01)


def server_seconds(weights: dict[str, torch.Tensor], num_classes: int, clients: int,
                   repeats: int, recalibration: bool) -> float:
    """Median time of the second server step (the first also initialises the features)."""
    cfg = parse_experiment({"model": {"feature_dim": D},
                                      "fedhpro": {"recalibration": recalibration}})
    generator = torch.Generator().manual_seed(0)
    replies = []
    for i in range(clients):
        record = encode_class_statistics(random_statistics(num_classes, generator),
                                         classifier=recalibration,
                                         feature_grads=not recalibration)
        stats = decode_class_statistics(
            record, num_classes, D, classifier=recalibration,
            measured_at=weights["classifier.weight"] if recalibration else None)
        replies.append(ClientReply(i, i, 100, weights, {"margin": 0.0}, stats))
    seconds = []
    for _ in range(repeats):
        strategy = get_method("fedhpro").make_strategy(cfg, weights, num_classes, D)
        strategy.server_step(0, weights, replies)
        start = time.perf_counter()
        strategy.server_step(1, weights, replies)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(num_classes: int, clients: int, repeats: int) -> dict[str, float]:
    cfg = parse_experiment({"model": {"feature_dim": D}})
    model = build_model(cfg.model, DataSpec((1, 28, 28), tuple(map(str, range(num_classes)))))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stats = random_statistics(num_classes, torch.Generator().manual_seed(1))
    return {
        "server_seconds": server_seconds(weights, num_classes, clients, repeats, True),
        "server_seconds_no_recal": server_seconds(weights, num_classes, clients, repeats, False),
        "weights_bytes": record_nbytes(tensors_to_record(weights)),
        "gradients_bytes": record_nbytes(encode_class_statistics(stats, feature_grads=False)),
        "gradients_bytes_fp16": record_nbytes(encode_class_statistics(stats, torch.float16,
                                                                      feature_grads=False)),
        "feature_gradients_bytes": record_nbytes(encode_class_statistics(stats,
                                                                         classifier=False)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 400])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    args = parser.parse_args()
    rows = []
    torch.set_num_threads(1)
    print("| classes | server step (s) | without recalibration (s) | weights MB "
          "| gradients MB | upload / FedAvg's | float16 gradients | without recalibration |")
    print("|---|---|---|---|---|---|---|---|")
    for c in args.classes:
        m = measure(c, args.clients, args.repeats)
        rows.append({"classes": c, **m})
        w, g = m["weights_bytes"], m["gradients_bytes"]
        h, f = m["gradients_bytes_fp16"], m["feature_gradients_bytes"]
        print(f"| {c} | {m['server_seconds']:.3f} | {m['server_seconds_no_recal']:.3f} "
              f"| {w / 1e6:.3f} | {g / 1e6:.3f} | {(w + g) / w:.3f}x | {(w + h) / w:.3f}x "
              f"| {(w + f) / w:.3f}x |", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
