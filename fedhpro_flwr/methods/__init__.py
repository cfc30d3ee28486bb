"""The registry of federated methods: `strategy` in the run config picks one by name.

To add a method, write a module with a client trainer and a Strategy (see `base.Method`),
and list its `METHOD` here.
"""

from __future__ import annotations

from fedhpro_flwr.methods import creff, fedavg, fedhpro, fedproto, fedprox, fedtgp, fpl
from fedhpro_flwr.methods.base import ClientTask, Method

METHODS: dict[str, Method] = {
    module.METHOD.name: module.METHOD
    for module in (fedhpro, fedavg, fedprox, fedproto, fedtgp, fpl, creff)
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
