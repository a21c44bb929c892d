"""Models beyond the MLP for ``backforward bench``, written as researchers write them (their own ``forward``).

All take flat MNIST-shaped input (batch, 784), like ``models.py``'s, and none is an
``nn.Sequential``: the fast path for them is the graph engine.

- ``ResNet``: torchvision-style basic blocks (3x3 convolutions, BatchNorm, in-place ReLU,
  ``out += identity``, a 1x1 convolution where the shape changes), average pooling, a linear head.
- ``DigitTransformer``: the 28 rows of a digit as 28 tokens; pre-norm encoder blocks
  (``nn.MultiheadAttention``, GELU MLP, dropout), a learned position embedding owned by
  the model itself, mean pooling, a linear head.
- ``LSTMClassifier``: the 28 rows as a sequence through an ``nn.LSTM``; the last hidden state
  feeds a linear head.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import CLASSES

SIDE = 28  # MNIST digits are SIDE x SIDE


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A stem, one basic block per width in ``widths`` (each after the first halves the resolution), a head."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        ins = (widths[0], *widths[:-1])
        self.blocks = nn.Sequential(*(BasicBlock(cin, cout, 1 if i == 0 else 2)
                                      for i, (cin, cout) in enumerate(zip(ins, widths, strict=True))))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x.view(-1, 1, SIDE, SIDE)))
        return self.head(torch.flatten(self.pool(h), 1))


class EncoderBlock(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.dropout(self.attention(h, h, h, need_weights=False)[0])
        return x + self.dropout(self.mlp(self.norm2(x)))


class DigitTransformer(nn.Module):
    def __init__(self, width: int = 32, layers: int = 2, heads: int = 4, hidden: int = 64, dropout: float = 0.1,
                 classes: int = CLASSES):
        super().__init__()
        self.embed = nn.Linear(SIDE, width)
        self.position = nn.Parameter(torch.zeros(1, SIDE, width))
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, hidden, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, SIDE, SIDE)) + self.position
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self, hidden: int = 64, layers: int = 1, classes: int = CLASSES):
        super().__init__()
        self.lstm = nn.LSTM(SIDE, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.view(-1, SIDE, SIDE))
        return self.head(out[:, -1])
