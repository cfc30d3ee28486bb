"""results.json: the run's configuration and one row of measurements per round."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from fedhpro_flwr.config import RunSettings

RESULTS_NAME = "results.json"


class RunResults:
    """Collects rows and rewrites results.json after each round (atomically)."""

    def __init__(self, settings: RunSettings, num_classes: int):
        self.path = settings.out_dir / RESULTS_NAME
        self.data: dict[str, Any] = {
            "strategy": settings.strategy,
            "config": settings.experiment.to_dict(),
            "config_file": str(settings.config_path),
            "num_classes": num_classes,
            # the experiment's identity for the clients, kept when it is resumed: what their
            # saved personal models are filed under (`personal_store`)
            "experiment_id": uuid.uuid4().hex,
            "initial": {},
            "rounds": [],
        }

    def set_initial(self, scores: dict[str, float]) -> None:
        """The untrained global model's evaluation (accuracy, loss, method extras)."""
        self.data["initial"] = dict(scores)

    def add_round(self, row: dict[str, Any]) -> None:
        self.data["rounds"].append(row)
        accuracies = [r["accuracy"] for r in self.data["rounds"]]
        self.data["final_accuracy"] = accuracies[-1]
        self.data["best_accuracy"] = max(accuracies)

    def restore(self, data: dict[str, Any]) -> None:
        """Continue from rows saved in a checkpoint (resume), as the same experiment."""
        self.data["experiment_id"] = data.get("experiment_id", self.data["experiment_id"])
        self.data["initial"] = data.get("initial", {})
        self.data["rounds"] = []
        for row in data.get("rounds", []):
            self.add_round(row)

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)
        return self.path
