"""Reference gradients by autograd, to check the closed forms of the algorithm modules."""

from collections.abc import Callable

import torch


def with_autograd(loss_fn: Callable[[torch.Tensor], torch.Tensor]
                  ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(loss, gradient) of a scalar loss, the shape of `gradmatch.descend`'s objectives."""

    def loss_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    return loss_and_grad
