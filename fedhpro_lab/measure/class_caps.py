"""Each class cap of FedHPro's server step on its own, at a saved round of a full-softmax run.

    fedhpro-bench measure class-caps CHECKPOINT [--config conf/glyphs100-lt.yaml]
                                     [--per-step 0 32 16] [--neighbours 8 16 32 64]

CHECKPOINT: a FedHPro run's checkpoint.pt made with every class in every step
(`fedhpro.recal_classes_per_step=0 fedhpro.hp_softmax_classes=0`, e.g. on conf/glyphs100-lt.yaml);
`--config` names the run's experiment (its data, model and recalibration schedule). Prints
(1) the test accuracy of a classifier trained by full-batch steps on the run's federated
features over every class (`--per-step` 0) and in groups of each other `--per-step` classes
(3 initialisations each), with the run's extractor; (2) for each `--neighbours` K nearest
classes, the share of the hyper-prototypes' full softmax they hold and the cosine between the
gradient they induce with the softmax restricted to them and the full one.
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
from fedhpro_flwr.methods.fedhpro import FedHProConfig


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path,
                        help="checkpoint.pt of a FedHPro run with every class in every step")
    parser.add_argument("--config", type=Path, default=Path("conf/glyphs100-lt.yaml"),
                        help="that run's experiment (default: %(default)s)")
    parser.add_argument("--per-step", type=int, nargs="+", default=[0, 32, 16],
                        help="classes per step of the classifier's training (0: all)")
    parser.add_argument("--neighbours", type=int, nargs="+", default=[8, 16, 32, 64],
                        help="nearest classes the hyper-prototypes' softmax is restricted to")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_experiment(args.config)
    hp_cfg = cfg.section(FedHProConfig)
    saved = torch.load(args.checkpoint, weights_only=True)
    model = build_model(cfg.model, dataset_spec(cfg))
    model.load_state_dict(saved["weights"])
    model.eval()
    test = held_out_data(cfg)
    with torch.no_grad():
        z = torch.cat([model.features(test.x[i:i + 512]) for i in range(0, len(test.x), 512)])
    state = saved["strategy_state"]
    weight, bias = saved["weights"]["classifier.weight"], saved["weights"]["classifier.bias"]
    for per_step in args.per_step:
        scores = []
        for seed in range(3):
            w, b = classifier_on(state["features"], state["seen"], "full-batch",
                                 hp_cfg.recal_epochs, hp_cfg.recal_lr, hp_cfg.recal_batch_size,
                                 torch.Generator().manual_seed(seed), per_step)
            scores.append(((z @ w.T + b).argmax(dim=-1) == test.y).float().mean().item())
        print(f"classes per step {per_step or 'all'}: test accuracy "
              + ", ".join(f"{s:.4f}" for s in scores))
    hp = state["hyperprototypes"]
    probs = torch.softmax(hp @ weight.T + bias, dim=-1)
    for count in args.neighbours:
        near = nearest_classes(hp, weight, bias, count)
        mass = probs.gather(2, near[:, None, :].expand(-1, hp.shape[1], -1)).sum(-1).mean()
        print(f"K = {count}: mass {mass:.3f}, gradient cosine "
              f"{neighbour_agreement(hp, weight, bias, near):.4f}")


if __name__ == "__main__":
    main()
