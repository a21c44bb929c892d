"""The plain definition of a Backforward step: small and obviously right, for tests and as the paper's loop.

This is the paper's naive implementation: n full forward and backward passes, every
weight gradient computed each time, and in pass k only stage k's update applied.
The engines must give the same parameters; the tests hold them to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def reference_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                   stages: Sequence[Sequence[nn.Parameter]],
                   closure: Callable[[], torch.Tensor]) -> list[float]:
    """One Backforward step by definition; returns the loss of each pass.

    ``stages`` are lists of parameters in update order. ``closure`` zeroes nothing;
    it computes the loss and calls ``backward()``.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    rng_start = torch.get_rng_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda_start = torch.cuda.get_rng_state_all() if cuda else None
    losses = []
    for k, stage in enumerate(stages):
        # Every pass sees the random numbers of the first one (same dropout masks).
        torch.set_rng_state(rng_start)
        if cuda_start is not None:
            torch.cuda.set_rng_state_all(cuda_start)
        for p in params:
            p.grad = None
        loss = closure()
        losses.append(float(loss.detach()))
        if k == 0:
            # Running statistics advance once, from the network the step started from.
            buffers_after_first = [b.detach().clone() for b in model.buffers()]
            rng_after = torch.get_rng_state()
            cuda_after = torch.cuda.get_rng_state_all() if cuda else None
        else:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers_after_first, strict=True):
                    b.copy_(saved)
        keep = {id(p) for p in stage}
        for p in params:
            if id(p) not in keep:
                p.grad = None
        optimizer.step()
    torch.set_rng_state(rng_after)
    if cuda_after is not None:
        torch.cuda.set_rng_state_all(cuda_after)
    return losses
