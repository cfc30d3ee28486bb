"""FedHPro's client time against plain CE training, same data, model, epochs and seed.

    fedhpro-bench measure client-overhead [--repeats 3] [--threads 1] [--device cuda]
                                          [--parallel 2] [--compile]
                                          [--overrides "model.name=resnet10 model.width=32"]

For every client of the default experiment, times one FedHPro client round (gradient extraction
+ CE/HPCL/HPAL training) and one round of CE-only training from the same initial weights, and
prints the per-client and total ratio. The two are timed in turn (CE, FedHPro, CE, ...) and the
median of `--repeats` kept, so that a change in the machine's load hits both alike.
`--parallel 2` times the clients in two processes at once, each on its own share of the clients:
two clients sharing the cores, as Flower's simulation runs them on a 2-core machine.
`--compile` runs both sides' feature extractor and classifier through `torch.compile`; the
first client's warm-up, which pays the compilation, is printed apart.
(benchmarks/measurements/GPU.md holds what it measured on GPUs.)
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import RecordDict

from fedhpro_flwr.algorithms.hyperproto import init_hyperprototypes
from fedhpro_flwr.algorithms.models import build_model, place
from fedhpro_flwr.algorithms.training import train_epochs
from fedhpro_flwr.config import parse_overrides
from fedhpro_flwr.data.federated import TensorData, client_data, dataset_spec
from fedhpro_flwr.methods import ClientTask, get_method, load_experiment
from fedhpro_flwr.methods.fedhpro import HP_RECORD, FedHProConfig
from fedhpro_flwr.methods.payload import tensors_to_record
from fedhpro_lab.simulation import APP_DIR

Row = tuple[int, int, float, float]  # partition, samples, CE seconds, FedHPro seconds


def time_clients(args: argparse.Namespace, partitions: list[int]) -> list[Row]:
    """(partition, samples, CE seconds, FedHPro seconds) for each of `partitions`."""
    torch.set_num_threads(args.threads)
    cfg = load_experiment(Path(args.config), parse_overrides(args.overrides))
    info = dataset_spec(cfg)
    device = torch.device(args.device)
    torch.manual_seed(cfg.seed)
    template = build_model(cfg.model, info)
    initial = template.state_dict()
    hp = init_hyperprototypes(info.num_classes, cfg.section(FedHProConfig).num_hyperprototypes,
                              template.feature_dim, torch.Generator().manual_seed(cfg.seed))
    content = RecordDict({HP_RECORD: tensors_to_record({"hp": hp})})
    fedhpro = get_method("fedhpro")

    def ce_only(task: ClientTask) -> None:
        train_epochs(task.model, task.data, cfg.train, task.generator, device)

    def timed(run: Callable[[ClientTask], object], data: TensorData) -> float:
        model = build_model(cfg.model, info)
        model.load_state_dict(initial)
        place(model, device)
        if args.compile:
            model.features = torch.compile(model.features)
            model.classifier = torch.compile(model.classifier)
        task = ClientTask(model, data, content, cfg, device,
                          torch.Generator().manual_seed(cfg.seed))
        start = time.perf_counter()
        run(task)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    rows = []
    for pid in partitions:
        data = client_data(cfg, pid)
        warm_up = timed(ce_only, data) + timed(fedhpro.client_train, data)
        if args.compile and pid == partitions[0]:
            print(f"first client's warm-up, compilation included: {warm_up:.1f} s")
        ce, hpro = [], []
        for _ in range(args.repeats):
            ce.append(timed(ce_only, data))
            hpro.append(timed(fedhpro.client_train, data))
        rows.append((pid, len(data), statistics.median(ce), statistics.median(hpro)))
    return rows


def table(rows: list[Row]) -> list[str]:
    """Per client and in all: the samples, both times and FedHPro's over CE's."""
    lines = [f"{'client':>6} {'samples':>7} {'CE s':>7} {'FedHPro s':>9} {'ratio':>6}"]
    for pid, samples, ce, hpro in rows:
        lines.append(f"{pid:>6} {samples:>7} {ce:>7.3f} {hpro:>9.3f} {hpro / ce:>6.2f}")
    total_ce, total_hp = sum(r[2] for r in rows), sum(r[3] for r in rows)
    lines.append(f"{'all':>6} {'':>7} {total_ce:>7.3f} {total_hp:>9.3f} "
                 f"{total_hp / total_ce:>6.2f}")
    return lines


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(APP_DIR / "conf" / "default.yaml"),
                        help="the experiment whose clients are timed (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings of each side per client; the median is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--parallel", type=int, default=1,
                        help="processes timing clients at once (2: two clients share the cores)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--overrides", default="", help="dotted YAML keys, as in a run config")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the feature extractor and classifier on both sides")
    args = parser.parse_args(argv)
    cfg = load_experiment(Path(args.config), parse_overrides(args.overrides))
    partitions = list(range(cfg.partition.num_partitions))
    if args.parallel == 1:
        rows = time_clients(args, partitions)
    else:
        shares = [partitions[i :: args.parallel] for i in range(args.parallel)]
        with multiprocessing.get_context("spawn").Pool(args.parallel) as pool:
            parts = pool.starmap(time_clients, [(args, share) for share in shares])
        rows = sorted(row for part in parts for row in part)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
