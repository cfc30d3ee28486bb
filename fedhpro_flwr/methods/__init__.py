"""The registry of federated methods: `strategy` in the run config picks one by name."""

from __future__ import annotations

from .base import ClientTask, Method
from .fedhpro import FedHProStrategy
from .fedhpro import client_train as fedhpro_client_train

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fedhpro", fedhpro_client_train, FedHProStrategy),
    )
}


def get_method(name: str) -> Method:
    """The method registered under `name`, or an error listing the available ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy '{name}'; available: {', '.join(sorted(METHODS))}"
        ) from None


__all__ = ["METHODS", "ClientTask", "Method", "get_method"]
