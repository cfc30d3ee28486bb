"""The registry of federated methods: `strategy` in the run config picks one by name.

To add a method, write a module with its client trainer, Strategy and config section (see
`base.Method`) and list the module here; tests, suites and config validation read this list.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedhpro_flwr.config import ExperimentConfig, read_experiment
from fedhpro_flwr.methods import (
    creff,
    fedavg,
    fedhpro,
    fednh,
    fedproto,
    fedprox,
    fedsa,
    fedtgp,
    fpl,
    moon,
)
from fedhpro_flwr.methods.base import ClientTask, Method

METHODS: dict[str, Method] = {
    module.METHOD.name: module.METHOD
    for module in (fedhpro, fedavg, fedprox, fedproto, fedtgp, fpl, creff, moon, fednh, fedsa)
}
# each method's config section (None: it has none), by name: what configs are checked against
SECTIONS: dict[str, type | None] = {name: m.section for name, m in METHODS.items()}


def get_method(name: str) -> Method:
    """The method registered under `name`, or an error listing the available ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy '{name}'; available: {', '.join(sorted(METHODS))}"
        ) from None


def parse_experiment(raw: Mapping[str, Any]) -> ExperimentConfig:
    """An experiment from a nested mapping, with every registered method's section."""
    return ExperimentConfig.from_dict(raw, SECTIONS)


def load_experiment(path: Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """An experiment YAML file with dotted-key `overrides`, every method's section checked."""
    return read_experiment(path, overrides, SECTIONS)


__all__ = ["METHODS", "SECTIONS", "ClientTask", "Method", "get_method", "load_experiment",
           "parse_experiment"]
