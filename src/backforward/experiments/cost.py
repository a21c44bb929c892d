"""The cost model of DESIGN §2, from each stage's FLOPs.

One unit of a stage's work is its forward multiply-adds f; its input gradient and its
weight gradient cost f each. With n stages and f₁ … fₙ:

- ``sgd``     3·Σf − f₁ (the first stage needs no input gradient)
- ``paper``   n times that: n full passes, every weight gradient each time
- ``generic`` pass k: forward Σf, weight grad f_k, input grads of the stages after k
- ``fast``    pass 1 as generic; pass k ≥ 2 recomputes from stage k−1 only
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def stage_flops(model: nn.Sequential, x: torch.Tensor) -> list[float]:
    """Forward multiply-adds of each parameterised child, in order (elementwise ones count their outputs)."""
    flops: list[float] = []

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            flops.append(inputs[0].numel() / module.in_features * module.in_features * module.out_features)
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            flops.append(float(output.numel() * k))
        else:
            flops.append(float(output.numel()))

    handles = [c.register_forward_hook(count) for c in model if any(True for _ in c.parameters())]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return flops


def predicted_units(flops: Sequence[float]) -> dict[str, float]:
    """Cost of one step of each method in FLOP units, by the model above."""
    n, total = len(flops), sum(flops)
    sgd = 3 * total - flops[0]
    generic = sum(total + flops[k] + sum(flops[k + 1:]) for k in range(n))
    fast = (total + flops[0] + sum(flops[1:])) + sum(
        sum(flops[k - 1:]) + flops[k] + sum(flops[k + 1:]) for k in range(1, n))
    return {"sgd": sgd, "paper": n * sgd, "generic": generic, "fast": fast}
