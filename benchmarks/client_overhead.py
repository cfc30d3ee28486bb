"""FedHPro's client time against plain CE training, same data, model, epochs and seed.

    python benchmarks/client_overhead.py [--repeats 3] [--threads 1] [--device cuda]
                                         [--overrides "model.name=resnet10 model.width=32"]

For every client of the default experiment, times one FedHPro client round (gradient extraction
+ CE/HPCL/HPAL training) and one round of CE-only training from the same initial weights, and
prints the per-client and total ratio. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from flwr.app import RecordDict

from fedhpro_flwr.algorithms.hyperproto import init_hyperprototypes
from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.algorithms.training import train_epochs
from fedhpro_flwr.config import parse_overrides
from fedhpro_flwr.data.federated import client_data, dataset_spec
from fedhpro_flwr.methods import ClientTask, get_method, load_experiment
from fedhpro_flwr.methods.fedhpro import HP_RECORD, FedHProConfig
from fedhpro_flwr.methods.payload import tensors_to_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1]
                                                / "conf" / "default.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--overrides", default="", help="dotted YAML keys, as in a run config")
    args = parser.parse_args()
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

    def timed(run, data) -> float:
        times = []
        for _ in range(args.repeats):
            model = build_model(cfg.model, info)
            model.load_state_dict(initial)
            model.to(device)
            task = ClientTask(model, data, content, cfg, device,
                              torch.Generator().manual_seed(cfg.seed))
            start = time.perf_counter()
            run(task)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    total_ce = total_hp = 0.0
    print(f"{'client':>6} {'samples':>7} {'CE s':>7} {'FedHPro s':>9} {'ratio':>6}")
    for pid in range(cfg.partition.num_partitions):
        data = client_data(cfg, pid)
        timed(ce_only, data)  # warm-up
        ce = timed(ce_only, data)
        hpro = timed(fedhpro.client_train, data)
        total_ce += ce
        total_hp += hpro
        print(f"{pid:>6} {len(data):>7} {ce:>7.3f} {hpro:>9.3f} {hpro / ce:>6.2f}")
    print(f"{'all':>6} {'':>7} {total_ce:>7.3f} {total_hp:>9.3f} {total_hp / total_ce:>6.2f}")


if __name__ == "__main__":
    main()
