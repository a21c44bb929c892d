"""The models of the experiments: the paper's MLP at any depth, with optional BatchNorm, and a small CNN.

All take flat MNIST-shaped input (batch, 784) and are ``nn.Sequential`` chains, so the
fast engine applies to them.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_FEATURES = 784
CLASSES = 10


def mlp(depth: int = 1, hidden: int = 256, *, batchnorm: bool = False, dropout: float = 0.0,
        in_features: int = INPUT_FEATURES, classes: int = CLASSES) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden`` with ReLU; depth 1, width 256 is the paper's 784-256-10."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    if hidden < 1:
        raise ValueError(f"hidden width must be at least 1, got {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers.append(nn.Linear(width, hidden))
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def small_cnn(channels: int = 8, classes: int = CLASSES) -> nn.Sequential:
    """Two 3x3 convolutions with pooling and a linear head, on 28x28 digits."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * channels * 7 * 7, classes),
    )


def weight_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of all parameters together ("total") and of each module's own parameters."""
    norms: dict[str, float] = {}
    squares = 0.0
    for name, module in model.named_modules():
        own = [p.detach() for p in module.parameters(recurse=False)]
        if own:
            sq = float(sum(torch.sum(p.double() ** 2) for p in own))
            norms[name or "(root)"] = sq ** 0.5
            squares += sq
    return {"total": squares ** 0.5, **norms}
