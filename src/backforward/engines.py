"""The engines: one Backforward step as n passes, and the fast pass for chains of stages.

``backforward_step`` is the loop both engines share. It owns everything DESIGN §1 asks
of a step whatever computes the passes: only stage k requires grad in pass k, every
pass sees the random numbers of the first, buffers (BatchNorm running statistics)
advance once from the first pass, and gradients end as the ones each stage was
updated with. A pass is a callable that computes the loss and its backward:

- generic engine: the user's closure, run whole each time (any ``nn.Module``); autograd
  computes no weight gradients for stages that do not require grad and stops below
  the earliest one that does;
- fast engine (``ChainEngine``): for an ``nn.Sequential``, pass k starts from the cached
  input of the first child that changed, so it recomputes only stage k-1 and what
  follows it; the cached input does not require grad, so backward stops at stage k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .stages import Stage

RunPass = Callable[[int, int], torch.Tensor]
"""run_pass(pass_index, stage_index) -> loss, with backward() already called."""


def rng_snapshot() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The CPU generator and, where CUDA is in use, every CUDA generator."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda else None)


def rng_restore(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def restore_buffers(buffers: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    """Copy saved values back into buffers (running statistics) in place."""
    with torch.no_grad():
        for b, value in zip(buffers, saved, strict=True):
            b.copy_(value)


@dataclass
class StepResult:
    """What a step leaves behind; stage lists are indexed by stage, not by pass."""

    losses: list[torch.Tensor]                  # detached pass losses, in pass order
    sequence: list[int]                         # stage updated in each pass
    used_grads: list[list[torch.Tensor | None]]  # G'_k: the gradient stage k was updated with
    start_grads: list[list[torch.Tensor | None]] | None  # G_k at θ_t (with keep_start_grads)


def backforward_step(model: nn.Module, stages: Sequence[Stage], run_pass: RunPass,
                     apply_update: Callable[[int], None], *,
                     sequence: Sequence[int] | Callable[[], Sequence[int]],
                     full_first_pass: bool, keep_start_grads: bool = False, others: Sequence[nn.Parameter] = (),
                     reduce_grads: Callable[[list[torch.Tensor]], None] | None = None) -> StepResult:
    """One Backforward step: pass j computes stage ``sequence[j]``'s gradient, then only it moves.

    ``sequence`` may be a callable evaluated after the first pass (the stage order is
    found during it); that needs ``full_first_pass``, in which every stage requires grad.
    ``keep_start_grads`` keeps (and averages) every stage's gradient of that pass: G_k at θ_t.
    ``others`` are trainable parameters outside every stage: they get no gradient.
    ``reduce_grads`` averages a list of tensors across processes in place (each pass's
    gradients and its loss, in one call).
    """
    if callable(sequence) and not full_first_pass:
        raise ValueError("a stage order found during the step needs a full first pass")
    stage_params = [p for s in stages for p in s.params]
    requires = [(p, p.requires_grad) for p in (*stage_params, *others)]
    used: list[list[torch.Tensor | None]] = [[None] * len(s.params) for s in stages]
    start_grads = None
    losses: list[torch.Tensor] = []
    order: list[int] = [] if callable(sequence) else list(sequence)
    buffers = list(model.buffers())
    rng_start = rng_snapshot()
    try:
        for p in others:
            p.requires_grad_(False)
        for j in range(len(stages)):
            if j > 0:
                rng_restore(rng_start)  # the same dropout masks in every pass
            full = j == 0 and full_first_pass
            for p in stage_params:
                p.grad = None
                p.requires_grad_(full)
            if not full:
                for p in stages[order[j]].params:
                    p.requires_grad_(True)
            with torch.enable_grad():
                loss = run_pass(j, order[j] if order else -1)
            if j == 0:
                if callable(sequence):
                    order = list(sequence())
                rng_after = rng_snapshot()
                buffers_after = [b.detach().clone() for b in buffers]
            else:
                restore_buffers(buffers, buffers_after)  # running statistics advance only with the first pass
            k = order[j]
            _check_pass(loss, stages, j, k)
            value = loss.detach().reshape(1).clone()
            if full:
                if keep_start_grads:
                    start_grads = [[None if p.grad is None else p.grad.detach().clone() for p in s.params]
                                   for s in stages]
                    if reduce_grads is not None:
                        reduce_grads([g for gs in start_grads for g in gs if g is not None])
                for i, s in enumerate(stages):
                    if i != k:
                        for p in s.params:
                            p.grad = None
            grads = [p.grad for p in stages[k].params]
            if reduce_grads is not None:
                # The pass loss rides along, so every process sees the same loss and stops on the same pass.
                reduce_grads([g for g in grads if g is not None] + [value])
            _check_finite(float(value[0]), stages, j, k)
            apply_update(k)
            used[k] = grads
            for p in stages[k].params:
                p.grad = None  # later passes and base steps must not see it
            losses.append(value[0])
        rng_restore(rng_after)  # as after one forward pass
    finally:
        for p, flag in requires:
            p.requires_grad_(flag)
        for s, grads in zip(stages, used, strict=True):
            for p, g in zip(s.params, grads, strict=True):
                p.grad = g
    return StepResult(losses, order, used, start_grads)


def _where(stages: Sequence[Stage], j: int, k: int) -> str:
    return f"pass {j + 1} (stage {k + 1}, {stages[k].name!r})"


def _check_pass(loss: object, stages: Sequence[Stage], j: int, k: int) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the closure must return the loss tensor; it returned {type(loss).__name__} "
                        f"in {_where(stages, j, k)}")
    if loss.numel() != 1:
        raise ValueError(f"the loss must be a scalar; got shape {tuple(loss.shape)} in {_where(stages, j, k)}")
    if loss.requires_grad and all(p.grad is None for p in stages[k].params):
        raise RuntimeError(f"the closure did not call backward() in {_where(stages, j, k)}")


def _check_finite(value: float, stages: Sequence[Stage], j: int, k: int) -> None:
    if not math.isfinite(value):
        moved = "; the stages before it were already updated" if j > 0 else ""
        raise FloatingPointError(f"non-finite loss {value} in {_where(stages, j, k)}{moved}")


def closure_pass(closure: Callable[[], torch.Tensor]) -> RunPass:
    """The generic engine's pass: the user's closure, run whole."""
    return lambda _j, _k: closure()


class ChainEngine:
    """Fast passes for an ``nn.Sequential``: prefix cache plus backward truncated at stage k.

    The plan (which child each pass starts from, which child inputs it stores for later
    passes, which it may drop after reading) depends only on the stage order, so it is
    made once. An input stored for pass m is produced by the last earlier pass that
    started before it; no stage in front of it moves in between (see ``_plan``).
    """

    def __init__(self, model: nn.Sequential, stages: Sequence[Stage], sequence: Sequence[int]):
        self.children = list(model)
        self.positions = stage_positions(model, stages)
        if self.positions is None:
            raise ValueError("the stages of this model do not form a chain")
        self.starts, self.stores, self.drops = _plan([self.positions[k] for k in sequence])
        self.copy_cache = False  # set once an in-place module is seen to modify a cached input
        self._cache: dict[int, tuple[torch.Tensor, int, tuple]] = {}

    @staticmethod
    def supports(model: nn.Module, stages: Sequence[Stage]) -> bool:
        """A plain ``nn.Sequential`` (no root hooks, no overridden forward) whose stages each lie in one child."""
        return (type(model).forward is nn.Sequential.forward
                and not (model._forward_hooks or model._forward_pre_hooks)
                and stage_positions(model, stages) is not None)

    def cached_activations(self) -> list[torch.Tensor]:
        """The child inputs held between passes (for memory accounting)."""
        return [t for t, _, _ in self._cache.values()]

    def make_pass(self, inputs: torch.Tensor, targets: torch.Tensor,
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> RunPass:
        """The pass function for one step on this batch (the cache starts empty each step)."""
        self._cache.clear()

        def run(j: int, _k: int) -> torch.Tensor:
            start, h = self.starts[j], inputs
            if start > 0:
                cached, version, rng = self._cache[start]
                if cached._version != version:   # an in-place module changed it: recompute whole
                    self.copy_cache, start = True, 0
                else:
                    rng_restore(rng)  # the random numbers a full pass would have reached here
                    h = cached if self.drops[j] or not self.copy_cache else cached.clone()
                if self.drops[j]:
                    del self._cache[self.starts[j]]
            for i in range(start, len(self.children)):
                if i in self.stores[j]:
                    kept = h.detach().clone() if self.copy_cache else h.detach()
                    self._cache[i] = (kept, kept._version, rng_snapshot())
                h = self.children[i](h)
            loss = loss_fn(h, targets)
            loss.backward()
            return loss

        return run


def stage_positions(model: nn.Sequential, stages: Sequence[Stage]) -> list[int] | None:
    """Index of the child holding each stage, or None if a stage spans children or a child repeats."""
    children = list(model)
    if len({id(c) for c in children}) != len(children):
        return None
    where = {id(p): i for i, c in enumerate(children) for p in c.parameters()}
    positions = []
    for s in stages:
        found = {where.get(id(p)) for p in s.params}
        if len(found) != 1 or None in found:
            return None
        positions.append(found.pop())
    return positions


def _plan(positions: Sequence[int]) -> tuple[list[int], list[set[int]], list[bool]]:
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
