"""The plain definition of a Backforward step: small and obviously right, for tests and as the paper's loop.

This is the paper's naive implementation, made the whole specification of a step (DESIGN §1):
n full forward and backward passes, every gradient computed each time, and in pass k only
stage k's update applied. It shares no code with the engines it checks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn


def reference_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                   stages: Sequence[Sequence[nn.Parameter]], closure: Callable[[], torch.Tensor],
                   max_grad_norm: float | None = None) -> list[float]:
    """One Backforward step by definition; returns the loss of each pass.

    ``stages`` are lists of parameters (held by ``optimizer``, requiring grad) in update
    order; finding them is not part of the definition. ``closure`` computes the loss, calls
    ``backward()`` and returns the loss.

    - Every pass sees the random numbers and buffers the step started with (None ones, and none a forward
      registers), with weights autocast casts anew (a step run inside autocast), and the base
      optimizer's step the group-level entries it set itself (schedule-free step counts)
      as before its first call; afterwards all are as after the first pass.
    - In pass k the base optimizer steps over stage k's parameters alone, with the gradient
      of this pass (clipped to ``max_grad_norm`` by stage k's own norm). Nothing else moves
      or gets a gradient: frozen parameters, and parameters the optimizer does not hold,
      keep whatever gradient they had.
    - After the step each stage's ``.grad`` is the gradient it was updated with.
    """
    groups = optimizer.param_groups
    stage_params = [p for stage in stages for p in stage]
    in_stages = {id(p) for p in stage_params}
    others = [(p, p.grad) for p in model.parameters() if id(p) not in in_stages]
    rng_start = _rng_state()
    buffers_start = _buffers(model)
    used = []
    losses = []
    before_step: list[dict] = []  # group entries before the first base step
    own_after: list[dict] = []    # the entries that step changed, as it left them
    for k, stage in enumerate(stages):
        _set_rng_state(rng_start)
        _set_buffers(buffers_start)
        torch.clear_autocast_cache()  # a step run inside autocast: the weights' casts, made before they moved
        for p in [*stage_params, *(p for p, _ in others)]:
            p.grad = None  # the closure's backward would accumulate into the others' gradients in place
        loss = closure()
        losses.append(float(loss.detach()))
        if k == 0:
            rng_after = _rng_state()
            buffers_after = _buffers(model)
        for p, grad in others:
            p.grad = grad
        for p in stage_params:
            if not any(p is q for q in stage):
                p.grad = None
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in stage if p.grad is not None], max_grad_norm)
        used.append([p.grad for p in stage])
        if k == 0:
            before_step = [_entries(group) for group in groups]
        else:  # what the base step set in pass 1, set back
            for group, before, after in zip(groups, before_step, own_after, strict=True):
                for key in after:
                    if key in before:
                        group[key] = copy.deepcopy(before[key])
                    else:
                        del group[key]
        full = [group["params"] for group in groups]
        for group in groups:
            group["params"] = [p for p in group["params"] if any(p is q for q in stage)]
        optimizer.step()
        for group, params in zip(groups, full, strict=True):
            group["params"] = params
        if k == 0:  # the entries the base step itself changed, as it left them (or removed)
            own_after = [{**{key: value for key, value in _entries(group).items()
                             if key not in before or not _equal(before[key], value)},
                          **{key: _REMOVED for key in before if key not in group}}
                         for group, before in zip(groups, before_step, strict=True)]
    _set_rng_state(rng_after)
    _set_buffers(buffers_after)
    torch.clear_autocast_cache()
    for group, after in zip(groups, own_after, strict=True):
        for key, value in after.items():
            if value is _REMOVED:
                group.pop(key, None)
            else:
                group[key] = value
    for stage, grads in zip(stages, used, strict=True):
        for p, grad in zip(stage, grads, strict=True):
            p.grad = grad
    return losses


def _rng_state():
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


Buffers = list[tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor] | None]]]


def _buffers(model: nn.Module) -> Buffers:
    """Every module's buffers, None ones too (a forward may set them, or register new ones): each tensor with a
    copy of its values, to be put back into that tensor (another module may hold it too: a shared buffer)."""
    return [(m, {name: None if b is None else (b, b.detach().clone()) for name, b in m._buffers.items()})
            for m in model.modules()]


def _set_buffers(saved: Buffers) -> None:
    for m, buffers in saved:
        for name in m._buffers.keys() - buffers.keys():
            del m._buffers[name]
        for name, held in buffers.items():
            m._buffers[name] = None if held is None else held[0]
            if held is not None and not _equal(held[0], held[1]):  # (one made in inference mode cannot be written)
                with torch.no_grad():
                    held[0].resize_(held[1].shape).copy_(held[1])


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # == on tensors inside would not say
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if getattr(a, "shape", None) != getattr(b, "shape", None):  # arrays: == would broadcast one to the other
        return False
    equal = a == b  # an array's == compares elementwise
    return bool(equal.all()) if hasattr(equal, "all") else bool(equal)


_REMOVED = object()


def _entries(group: dict) -> dict:
    return copy.deepcopy({key: value for key, value in group.items() if key != "params"})
