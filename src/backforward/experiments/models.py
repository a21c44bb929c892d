"""The models of the experiments: the paper's MLP at any depth (optionally with BatchNorm or
without activations: a deep linear network), a residual MLP, a small CNN, and the
initialisation schemes the studies declare.

All take flat MNIST-shaped input (batch, 784). The MLP, the deep linear network and the
CNN are ``nn.Sequential`` chains of stages, so the fast engine applies to them; the
residual MLP is not a chain (a block holds two stages and a skip), so Backforward runs
it with the closure engine.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INPUT_FEATURES = 784
CLASSES = 10
ARCHS = ("mlp", "linear", "resmlp", "cnn")
INITS = ("default", "kaiming", "orthogonal")


def mlp(depth: int = 1, hidden: int = 256, *, batchnorm: bool = False, dropout: float = 0.0, relu: bool = True,
        in_features: int = INPUT_FEATURES, classes: int = CLASSES) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden``; depth 1, width 256 is the paper's 784-256-10.

    ``relu=False`` leaves out the activations: a deep linear network (Santurkar et al.'s DLN).
    """
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
        if relu:
            layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """x -> relu(x + W2 relu(W1 x)): two stages and a skip connection."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.outer(torch.relu(self.inner(x))))


def residual_mlp(blocks: int = 2, hidden: int = 256, classes: int = CLASSES) -> nn.Sequential:
    """An input layer, ``blocks`` residual blocks of width ``hidden``, a linear head: 2 + 2·blocks stages."""
    if blocks < 1:
        raise ValueError(f"blocks must be at least 1, got {blocks}")
    return nn.Sequential(nn.Linear(INPUT_FEATURES, hidden), nn.ReLU(),
                         *[ResidualBlock(hidden) for _ in range(blocks)], nn.Linear(hidden, classes))


def small_cnn(channels: int = 8, classes: int = CLASSES) -> nn.Sequential:
    """Two 3x3 convolutions with pooling and a linear head, on 28x28 digits."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * channels * 7 * 7, classes),
    )


def initialise(model: nn.Module, scheme: str, relu: bool = True) -> nn.Module:
    """Re-draw the weights of every Linear and Conv2d (biases to 0) by ``scheme``, from torch's RNG.

    - ``default``: leave PyTorch's initialisation (uniform, variance 1/(3·fan_in): the
      forward signal shrinks with depth in a ReLU network, as the depth study shows);
    - ``kaiming``: He et al. (2015) normal, variance 2/fan_in, derived so that a ReLU layer
      keeps the variance of its input: deep ReLU MLPs train with it;
    - ``orthogonal``: Saxe et al. (2014) orthogonal weights, gain √2 before a ReLU: an
      exact isometry for a deep linear network (``relu=False``).
    The output layer (the last weight layer) gets gain 1 in both schemes, as do all layers
    of a network without ReLUs.
    """
    if scheme not in INITS:
        raise ValueError(f"unknown initialisation {scheme!r} (choose from {', '.join(INITS)})")
    if scheme == "default":
        return model
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            gain = math.sqrt(2.0) if relu and i < len(layers) - 1 else 1.0
            if scheme == "kaiming":
                fan_in = layer.weight[0].numel()
                layer.weight.normal_(0.0, gain / math.sqrt(fan_in))
            else:
                nn.init.orthogonal_(layer.weight, gain=gain)
            if layer.bias is not None:
                layer.bias.zero_()
    return model


def build(arch: str = "mlp", depth: int = 1, hidden: int = 256, *, batchnorm: bool = False,
          init: str = "default") -> nn.Module:
    """The model a training run declares: ``arch`` with ``depth`` hidden layers (residual blocks for
    ``resmlp``; ignored for ``cnn``), initialised by ``init``."""
    if arch == "mlp":
        model = mlp(depth, hidden, batchnorm=batchnorm)
    elif arch == "linear":
        model = mlp(depth, hidden, batchnorm=batchnorm, relu=False)
    elif arch == "resmlp":
        model = residual_mlp(depth, hidden)
    elif arch == "cnn":
        model = small_cnn()
    else:
        raise ValueError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHS)})")
    return initialise(model, init, relu=arch != "linear")


def linear_stage_names(model: nn.Module) -> list[str]:
    """Names of the model's Linear and Conv2d modules, as the stage finder names their stages."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


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
