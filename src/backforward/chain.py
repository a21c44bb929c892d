"""The fast engine for a chain of stages (an ``nn.Sequential``): the paper's "better implementation".

Pass k starts from the cached input of the first child whose result changed (the child
holding the stage that moved last), so it recomputes only that child and the ones after
it; its backward stops at stage k. The plan (which child each pass starts from, which
child inputs it stores for later passes, which it may drop after reading) depends only
on the update order, so it is made once per order. An input stored for pass m is produced
by the last earlier pass that started before it; no stage in front of it moves in between.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .engines import RunPass, StageGradients
from .replay import RngState, rng_restore, rng_snapshot
from .stages import Stage


class ChainEngine:
    """Prefix cache plus backward restricted to stage k, for a plain ``nn.Sequential``."""

    def __init__(self, model: nn.Sequential, stages: Sequence[Stage], order: Sequence[int]):
        self.children = list(model)
        positions = stage_positions(model, stages)
        if positions is None:
            raise ValueError("the stages of this model do not form a chain")
        self.starts, self.stores, self.drops = plan([positions[k] for k in order])
        self.copy_cache = False  # set once an in-place module is seen to modify a cached input
        self._cache: dict[int, tuple[torch.Tensor, int, RngState]] = {}

    @staticmethod
    def supports(model: nn.Module, stages: Sequence[Stage]) -> bool:
        """A plain ``nn.Sequential`` (no root hooks, no overridden forward) whose stages each lie in one child,
        no parameter shared by two children."""
        return (isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward
                and not (model._forward_hooks or model._forward_pre_hooks)
                and stage_positions(model, stages) is not None)

    def cached_activations(self) -> list[torch.Tensor]:
        """The child inputs held between passes (for memory accounting)."""
        return [t for t, _, _ in self._cache.values()]

    def make_pass(self, inputs: torch.Tensor, targets: Any,
                  loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]) -> RunPass:
        """The pass function for one step on this batch (the cache starts empty each step)."""
        self._cache.clear()

        def run(j: int, gradients: StageGradients) -> torch.Tensor:
            start, h = self.starts[j], inputs
            if start > 0:
                cached, version, rng = self._cache[start]
                if cached._version != version:   # an in-place module changed it: recompute whole
                    self.copy_cache, start = True, 0
                else:
                    rng_restore(rng)  # the random numbers a full pass would have reached here
                    if not self.drops[j] and self.copy_cache:  # a later pass reads it again: keep it intact
                        cached = cached.detach().clone().requires_grad_(cached.requires_grad)
                    h = _Alias.apply(cached) if cached.requires_grad else cached
                if self.drops[j]:
                    del self._cache[self.starts[j]]
            for i in range(start, len(self.children)):
                if i in self.stores[j]:
                    kept = h.detach().clone() if self.copy_cache else h.detach()
                    # A cached input requires grad as it did in the full forward (modules choose kernels by it).
                    kept.requires_grad_(h.requires_grad)
                    self._cache[i] = (kept, kept._version, rng_snapshot())
                h = self.children[i](h)
            loss = loss_fn(h, targets)
            gradients.backward(loss)
            return loss

        return run


class _Alias(torch.autograd.Function):
    """The cached tensor again, as a non-leaf: a module may then modify it in place, as in the full forward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def stage_positions(model: nn.Sequential, stages: Sequence[Stage]) -> list[int] | None:
    """Index of the child holding each stage, or None if a stage spans children, a child repeats, or a
    parameter lives in two children (a reused module, tied weights)."""
    children = list(model)
    if len({id(c) for c in children}) != len(children):
        return None
    where: dict[int, int] = {}
    for i, child in enumerate(children):
        for p in child.parameters():
            if where.setdefault(id(p), i) != i:
                return None
    positions = []
    for s in stages:
        found = {where.get(id(p)) for p in s.params}
        if len(found) != 1 or None in found:
            return None
        positions.append(found.pop())
    return positions


def plan(positions: Sequence[int]) -> tuple[list[int], list[set[int]], list[bool]]:
    """Per pass: the child it starts from, the child inputs it stores, whether it drops what it read.

    Pass m updates the stage at ``positions[m]``; the stage at ``positions[m-1]`` moved
    just before it. It must start at or before both: start_m = min of the two (0 for the
    first pass). Its input was produced by the last earlier pass that started before it.
    """
    n = len(positions)
    starts = [0] + [min(positions[m - 1], positions[m]) for m in range(1, n)]
    producer = [max(i for i in range(m) if starts[i] < starts[m]) if starts[m] > 0 else None
                for m in range(n)]
    stores: list[set[int]] = [set() for _ in range(n)]
    for m in range(n):
        if producer[m] is not None:
            stores[producer[m]].add(starts[m])
    drops = [producer[m] is not None
             and not any(producer[later] == producer[m] and starts[later] == starts[m] for later in range(m + 1, n))
             for m in range(n)]
    return starts, stores, drops
