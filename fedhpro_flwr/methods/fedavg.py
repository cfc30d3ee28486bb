"""FedAvg (McMahan et al., AISTATS 2017): CE on clients, sample-weighted mean on the server.

The server side is `ExperimentStrategy` with no hook overridden: Flower's FedAvg plus reply
validation and accounting.
"""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedhpro_flwr.algorithms.training import train_epochs
from fedhpro_flwr.methods.base import ClientTask, Method
from fedhpro_flwr.methods.strategy import ExperimentStrategy


def client_train(task: ClientTask) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
    """Local SGD on cross-entropy only."""
    metrics = train_epochs(task.model, task.data, task.cfg.train, task.generator, task.device,
                           privacy=task.privacy)
    return {}, metrics


METHOD = Method("fedavg", client_train, lambda cfg, ref, _c, _d: ExperimentStrategy(cfg, ref))
