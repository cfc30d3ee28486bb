"""For client updates built by hand: a node's kept state in memory (`methods.base.KeptModel`),
model states and how far two of them are apart."""

import torch


class Kept:
    """What `load` gives and what `save` got."""

    def __init__(self, loaded=None):
        self.loaded, self.saved = loaded, None

    def load(self):
        return self.loaded

    def save(self, state):
        self.saved = {k: v.detach().clone() for k, v in state.items()}


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two states (of the same keys)."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
