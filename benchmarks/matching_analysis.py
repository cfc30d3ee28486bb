"""Why FedHPro's gradient matching barely moves the hyper-prototypes: numbers from one run.

    python benchmarks/matching_analysis.py RUN_DIR [RUN_DIR ...]

RUN_DIR is a FedHPro run's out-dir (results.json + checkpoint.pt, e.g.
benchmarks/ablation/runs/mnist-dir0.5/fedhpro/seed0). At the checkpoint's global model and
hyper-prototypes P, with every client's per-class feature gradients measured as the clients
measure them, it prints:

- how much of a client gradient g_c and of a hyper-prototype gradient points along -w_c
  (w_c: the classifier's row for class c): dCE/dz = W^T (softmax - e_c) = sum_j p_j w_j - w_c;
- the matching loss per class (cosine distance) and the size of one matching step relative to
  ||P|| (lr_hp x ||dLoss/dP|| / ||P||);
- the share of dLoss/dP and of P inside the span of W's rows (only C of d directions);
- where the anchors sit: their cosine with w_c and with the clients' mean class features,
  and the mean cosine between two classes' anchors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fedhpro_flwr.algorithms.extraction import extract_class_statistics
from fedhpro_flwr.algorithms.gradmatch import class_gradients, masked_class_mean
from fedhpro_flwr.algorithms.hyperproto import anchors, matching_loss
from fedhpro_flwr.algorithms.models import build_model
from fedhpro_flwr.data.federated import client_data, dataset_spec
from fedhpro_flwr.methods import parse_experiment
from fedhpro_flwr.methods.fedhpro import FedHProConfig


def share_in_span(vectors: torch.Tensor, basis: torch.Tensor) -> float:
    """||projection of `vectors` onto the column span of `basis`|| / ||vectors||."""
    q, _ = torch.linalg.qr(basis)
    return ((vectors @ q @ q.T).norm() / vectors.norm()).item()


def analyse(run: Path) -> dict[str, float]:
    results = json.loads((run / "results.json").read_text())
    cfg = parse_experiment(results["config"])
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    spec = dataset_spec(cfg)
    model = build_model(cfg.model, spec)
    model.load_state_dict(state["weights"])
    hp = state["strategy_state"]["hyperprototypes"]
    weight, bias = state["weights"]["classifier.weight"], state["weights"]["classifier.bias"]

    generator = torch.Generator().manual_seed(0)
    batch_real = cfg.section(FedHProConfig).batch_real
    stats = [extract_class_statistics(model, client_data(cfg, k), batch_real, 1, generator,
                                      torch.device("cpu"))
             for k in range(cfg.partition.num_partitions)]
    means = [s.feature_means for s in stats]
    held = torch.stack([s.present for s in stats])
    target, holders = masked_class_mean(torch.stack([s.feature_grads for s in stats]), held)
    class_means, _ = masked_class_mean(torch.stack(list(means)), held)
    present = holders > 0

    p = hp.clone().requires_grad_(True)
    loss = matching_loss(p, weight, bias, target, present, "cosine")
    loss.backward()
    assert p.grad is not None
    hp_grads = class_gradients(hp, weight, bias, with_classifier=False).feature
    a = anchors(hp)
    unit = F.normalize(a, dim=1)
    off_diagonal = ~torch.eye(len(a), dtype=torch.bool)
    return {
        "round": state["round"],
        "cos(client gradient g_c, -w_c)": F.cosine_similarity(
            target[present], -weight[present], dim=1).mean().item(),
        "cos(hyper-prototype gradient, -w_c)": F.cosine_similarity(
            hp_grads[present], -weight[present], dim=1).mean().item(),
        "matching loss per class": loss.item() / int(present.sum()),
        "one step / ||P|| (lr_hp x grad)": cfg.section(FedHProConfig).lr_hp * p.grad.norm().item()
        / hp.norm().item(),
        "share of dLoss/dP in span(W rows)": share_in_span(p.grad.flatten(0, 1), weight.T),
        "share of P in span(W rows)": share_in_span(hp.flatten(0, 1), weight.T),
        "share of a random (C x d) span (sqrt(C/d))": (len(weight) / weight.shape[1]) ** 0.5,
        "cos(anchor_c, w_c)": F.cosine_similarity(a, weight, dim=1).mean().item(),
        "cos(anchor_c, clients' mean feature of c)": F.cosine_similarity(
            a[present], class_means[present], dim=1).mean().item(),
        "mean cos between two classes' anchors": (unit @ unit.T)[off_diagonal].mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        print(run)
        for key, value in analyse(run).items():
            print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
    main()
