"""FedHPro's server step as the number of classes grows, and what a client uploads.

    fedhpro-bench measure server-scaling [--classes 10 100 400] [--clients 10] [--repeats 3]
                                         [--csv benchmarks/measurements/server_scaling.csv]

For each number of classes C, builds the FedHPro Strategy for a d = 128 model, feeds it the
replies of `--clients` clients that each hold every class (random per-class statistics of the
real shapes, sent through the real encoder and decoder), and times `server_step` with one
thread: with the paper's recalibration (from the clients' classifier gradients, minibatch SGD)
+ hyper-prototype matching, with `fedhpro.recal_source=moments` (recalibration from the
clients' class feature moments) and minibatch SGD, with full-batch steps over every class
(the default until 2026-11-30), as configured (moments, full-batch steps on groups of 32
classes, the hyper-prototypes matched over their 32 nearest classes) and with
`fedhpro.recalibration=false` (matching only); all but the configured one over every class in
every step. Also prints the bytes one client uploads per round: the model weights (a CNN whose
classifier has C outputs) and the class statistics of each variant, and the classifier
gradients in float16 (`fedhpro.float16_upload`).
Run it on an otherwise idle machine. The rows are also written to `--csv`; written as
server_scaling.csv beside a suite's results.csv, they join that suite's report
(`fedhpro_lab.report`: a table and a plot).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict

from fedhpro_flwr.algorithms.extraction import ClassStatistics
from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.config import ExperimentConfig
from fedhpro_flwr.data.federated import DataSpec
from fedhpro_flwr.methods import get_method, parse_experiment
from fedhpro_flwr.methods.fedhpro import FedHProConfig, upload_record
from fedhpro_flwr.methods.payload import record_nbytes, tensors_to_record
from fedhpro_flwr.methods.recalibrating import STATS_RECORD
from fedhpro_flwr.methods.strategy import ClientReply, ExperimentStrategy
from fedhpro_lab.measure import RESULTS_DIR

D = 128  # the feature dimension of every configured CNN

FULL = {"recal_classes_per_step": 0, "hp_softmax_classes": 0}  # every class in every step
VARIANTS = {  # fedhpro keys of each measured variant
    "gradients": {"recal_source": "gradients", "recal_solver": "sgd", **FULL},  # the paper's
    "moments": {"recal_source": "moments", "recal_solver": "sgd", **FULL},
    "full_softmax": FULL,  # as configured but over every class: the default until 2026-11-30
    # as configured: moments, full-batch steps on groups of 32 classes, the hyper-prototypes
    # matched over their 32 nearest classes
    "moments_full_batch": {},
    "no_recal": {"recalibration": False, **FULL},
}


def random_statistics(num_classes: int, generator: torch.Generator) -> ClassStatistics:
    """What a client holding every class would measure, at the real shapes (values random)."""
    c = num_classes
    return ClassStatistics(torch.ones(c, dtype=torch.bool), torch.full((c,), 50),
                           torch.randn(c, D, generator=generator) * 0.01,
                           torch.randn(c, c, D, generator=generator) * 0.01,
                           torch.randn(c, c, generator=generator) * 0.01,
                           torch.rand(c, D, generator=generator),
                           torch.rand(c, generator=generator))


def client_replies(receiver: ExperimentStrategy, cfg: ExperimentConfig,
                   weights: dict[str, torch.Tensor], num_classes: int, clients: int,
                   generator: torch.Generator) -> list[ClientReply]:
    """`clients` replies of random class statistics, through the upload's encoder and
    `receiver`'s decoder as a round's replies go."""
    replies = []
    for i in range(clients):
        record = upload_record(random_statistics(num_classes, generator),
                               cfg.section(FedHProConfig))
        stats = receiver.decode_extra(RecordDict({STATS_RECORD: record}))
        replies.append(ClientReply(i, i, 100, weights, {"margin": 0.0}, stats))
    return replies


def server_seconds(weights: dict[str, torch.Tensor], num_classes: int, clients: int,
                   repeats: int, fedhpro: dict[str, Any]) -> float:
    """Median time of the second server step (the first also initialises the features)."""
    cfg = parse_experiment({"model": {"feature_dim": D}, "fedhpro": fedhpro})
    receiver = get_method("fedhpro").make_strategy(cfg, weights, num_classes, D)
    replies = client_replies(receiver, cfg, weights, num_classes, clients,
                             torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(repeats):
        strategy = get_method("fedhpro").make_strategy(cfg, weights, num_classes, D)
        strategy.server_step(0, weights, replies)
        start = time.perf_counter()
        strategy.server_step(1, weights, replies)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(num_classes: int, clients: int, repeats: int) -> dict[str, float]:
    """One CSV row less its classes: the weights' bytes, and per variant the server step's
    seconds and a client's upload bytes beside the weights."""
    cfg = parse_experiment({"model": {"feature_dim": D}})
    model = build_model(cfg.model, DataSpec((1, 28, 28), tuple(map(str, range(num_classes)))))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stats = random_statistics(num_classes, torch.Generator().manual_seed(1))
    row: dict[str, float] = {"weights_bytes": record_nbytes(tensors_to_record(weights))}
    for name, fedhpro in VARIANTS.items():
        hp_cfg = parse_experiment({"fedhpro": fedhpro}).section(FedHProConfig)
        row[f"server_seconds_{name}"] = server_seconds(weights, num_classes, clients, repeats,
                                                       fedhpro)
        row[f"upload_bytes_{name}"] = record_nbytes(upload_record(stats, hp_cfg))
    half = parse_experiment({"fedhpro": {**VARIANTS["gradients"], "float16_upload": True}}
                            ).section(FedHProConfig)
    row["upload_bytes_gradients_fp16"] = record_nbytes(upload_record(stats, half))
    return row


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 400],
                        help="the numbers of classes measured, one CSV row each")
    parser.add_argument("--clients", type=int, default=10,
                        help="replies per server step, each holding every class")
    parser.add_argument("--repeats", type=int, default=3,
                        help="server steps timed per variant; the median is kept")
    parser.add_argument("--csv", type=Path, default=RESULTS_DIR / "server_scaling.csv",
                        help="where the rows are written (default: %(default)s)")
    args = parser.parse_args(argv)
    rows = []
    torch.set_num_threads(1)
    print(f"| classes | server step (s): {' | '.join(VARIANTS)} | weights MB "
          f"| upload / FedAvg's: gradients | float16 | moments | no recalibration |")
    print("|---" * (len(VARIANTS) + 6) + "|")
    for c in args.classes:
        m = measure(c, args.clients, args.repeats)
        rows.append({"classes": c, **m})
        w = m["weights_bytes"]
        ratios = " | ".join(f"{(w + m[f'upload_bytes_{k}']) / w:.3f}x"
                            for k in ("gradients", "gradients_fp16", "moments", "no_recal"))
        steps = " | ".join(f"{m[f'server_seconds_{k}']:.3f}" for k in VARIANTS)
        print(f"| {c} | {steps} | {w / 1e6:.3f} | {ratios} |", flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
