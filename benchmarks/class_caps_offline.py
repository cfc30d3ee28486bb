"""Each class cap of FedHPro's server step on its own, at a saved round of a full-softmax run.

    python benchmarks/class_caps_offline.py CHECKPOINT [--config conf/glyphs100-lt.yaml]

CHECKPOINT: a FedHPro run's checkpoint.pt made with every class in every step (e.g. the
recalibration suite's `runs/glyphs100-lt/fedhpro-moments-full-batch/seed0/checkpoint.pt`).
Prints (1) the test accuracy of a classifier trained on the run's federated features over every
class and in groups of 32 and 16 classes (3 initialisations each), with the run's extractor;
(2) for K nearest classes, the share of the hyper-prototypes' full softmax they hold and the
cosine between the gradient they induce with the softmax restricted to them and the full one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedhpro_flwr.algorithms.hyperproto import nearest_classes, neighbour_agreement
from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.algorithms.recalibration import classifier_on
from fedhpro_flwr.data.federated import dataset_spec, held_out_data
from fedhpro_flwr.methods import load_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--config", type=Path, default=Path("conf/glyphs100-lt.yaml"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_experiment(args.config)
    saved = torch.load(args.checkpoint, weights_only=False)
    model = build_model(cfg.model, dataset_spec(cfg))
    model.load_state_dict(saved["weights"])
    model.eval()
    test = held_out_data(cfg)
    with torch.no_grad():
        z = torch.cat([model.features(test.x[i:i + 512]) for i in range(0, len(test.x), 512)])
    state = saved["strategy_state"]
    weight, bias = saved["weights"]["classifier.weight"], saved["weights"]["classifier.bias"]
    for per_step in (0, 32, 16):
        scores = []
        for seed in range(3):
            w, b = classifier_on(state["features"], state["seen"], "full-batch", 100, 0.01, 50,
                                 torch.Generator().manual_seed(seed), weight, per_step)
            scores.append(((z @ w.T + b).argmax(dim=-1) == test.y).float().mean().item())
        print(f"classes per step {per_step or 'all'}: test accuracy "
              + ", ".join(f"{s:.4f}" for s in scores))
    hp = state["hyperprototypes"]
    probs = torch.softmax(hp @ weight.T + bias, dim=-1)
    for count in (8, 16, 32, 64):
        near = nearest_classes(hp, weight, bias, count)
        mass = probs.gather(2, near[:, None, :].expand(-1, hp.shape[1], -1)).sum(-1).mean()
        print(f"K = {count}: mass {mass:.3f}, gradient cosine "
              f"{neighbour_agreement(hp, weight, bias, near):.4f}")


if __name__ == "__main__":
    main()
