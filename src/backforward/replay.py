"""What every pass of a step replays, and what a failed step puts back.

Every pass of a Backforward step evaluates the same network function at a different
point: it sees the random numbers (dropout masks), the buffers (running statistics)
and the base optimizer's group-level state that the step started with. After the step
they are as after the first pass, as one plain forward and one base step leave them.
A step that fails puts back everything it started with (``Rollback``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

RngState = tuple[torch.Tensor, list[torch.Tensor] | None]


def rng_snapshot() -> RngState:
    """The CPU generator and, where CUDA is in use, every CUDA generator.

    Not the CUDA generators while a CUDA graph is being captured: their state cannot be
    read or set then, and ``cuda_graphs`` refuses forwards that draw random numbers.
    """
    cuda = torch.cuda.is_initialized() and not torch.cuda.is_current_stream_capturing()
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda else None)


def rng_restore(state: RngState) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


BufferSlot = tuple[nn.Module, str]  # a buffer is found again by its module and name: modules may replace it


def buffer_slots(model: nn.Module) -> list[BufferSlot]:
    return [(module, name) for module in model.modules() for name, b in module._buffers.items() if b is not None]


class BufferValues:
    """The buffers of some modules at one moment, to put back in place: which names each module holds (a forward
    may set a None one, or register one) and the values of those that are tensors (modules may have replaced
    them).

    Every buffer is copied: kernels such as batch norm's update running statistics in
    place without bumping the tensor's version counter, so a change cannot be detected.
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.held = [(m, dict(m._buffers)) for m in modules if m._buffers]
        self.values = [(t, t.detach().clone()) for _, held in self.held for t in held.values() if t is not None]
        self.empty = [m for m in modules if not m._buffers]  # a forward may register one

    def changed(self) -> bool:
        """Whether a buffer that was a tensor was replaced or holds another value now (NaN where NaN was is no
        change)."""
        return any(m._buffers.get(name) is not t for m, held in self.held for name, t in held.items()
                   if t is not None) or not all(same_values(t, value) for t, value in self.values)

    def put_back(self) -> None:
        for m, held in self.held:
            if m._buffers.keys() != held.keys() or any(m._buffers[k] is not t for k, t in held.items()):
                m._buffers.clear()
                m._buffers.update(held)
        for m in self.empty:
            if m._buffers:
                m._buffers.clear()
        for t, value in self.values:
            copy_back(t, value)


def copy_back(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """``value`` into ``tensor`` in place, at its shape again where a forward resized it in place (an observer's
    min/max, empty until it ran). A tensor that cannot be written (made in inference mode, an expanded one)
    cannot have been changed either: left as it is where it holds ``value``."""
    with torch.no_grad():
        try:
            if tensor.shape != value.shape:
                tensor.resize_(value.shape)
            tensor.copy_(value)
        except RuntimeError:
            if not same_values(tensor, value):
                raise


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b).all())


class InputModified(RuntimeError):
    """The model modified step_batch's input in place where no copy was kept to put it back."""


class InputValues:
    """A batch the model may modify in place (``nn.Dropout(inplace=True)`` first): put back before each pass,
    and left as the first pass left it (as one plain forward would), whichever passes modified it.

    A copy is kept only where asked (``keep``): the first step, to find out, and every step of
    a model found to modify its input.
    """

    def __init__(self, inputs: Sequence[torch.Tensor], keep: bool):
        self.inputs = inputs
        self.versions = [t._version for t in inputs]
        self.copies = [t.detach().clone() for t in inputs] if keep else None
        self.modified = False
        self.after_first: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # inputs the first pass changed, as it
        # left them (value, version)

    def keep_after_first(self) -> None:
        self.after_first = [(t, t.detach().clone(), t._version)
                            for t, v in zip(self.inputs, self.versions, strict=True) if t._version != v]

    def as_after_first(self) -> None:
        with torch.no_grad():
            for t, value, version in self.after_first:
                if t._version != version:  # put back (and maybe modified again) by a later pass
                    t.copy_(value)

    def put_back(self) -> None:
        for i, t in enumerate(self.inputs):
            if t._version == self.versions[i]:
                continue
            self.modified = True
            if self.copies is None:
                raise InputModified("the model modified its input in place in this step, which it had not done "
                                   "before; the step was undone: run it again (the input is now copied each step)")
            with torch.no_grad():
                t.copy_(self.copies[i])
            self.versions[i] = t._version


class Replay:
    """Random numbers, buffers and the batch: every pass sees the step's start; afterwards, as after the first."""

    def __init__(self, modules: Sequence[nn.Module], inputs: InputValues | None = None):
        self.modules = modules
        self.inputs = inputs
        self.rng_start = rng_snapshot()
        self.start = BufferValues(modules)
        self.rng_after: RngState | None = None
        self.after: BufferValues | None = None

    def before_pass(self, j: int) -> None:
        if j > 0:
            rng_restore(self.rng_start)  # the same dropout masks in every pass
            self.start.put_back()
            if self.inputs is not None:
                self.inputs.put_back()

    def after_pass(self, j: int) -> None:
        if j == 0:
            self.rng_after = rng_snapshot()
            self.after = BufferValues(self.modules)  # running statistics advance with the first pass only
            if self.inputs is not None:
                self.inputs.keep_after_first()

    def finish(self) -> None:
        assert self.rng_after is not None and self.after is not None
        rng_restore(self.rng_after)
        self.after.put_back()
        if self.inputs is not None:
            self.inputs.as_after_first()

    def rollback(self) -> None:
        rng_restore(self.rng_start)
        self.start.put_back()
        if self.inputs is not None and self.inputs.copies is not None:  # (without a copy: as the step left it)
            self.inputs.put_back()


def _group_entries(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value if type(value) in _ATOMS else _copy(value) for key, value in group.items() if key != "params"}


def _changed_keys(before: dict[str, Any], group: dict[str, Any]) -> list[str]:
    """The entries of ``group`` (other than params) that differ from ``before``, or that it added or removed."""
    differ = [key for key, value in group.items() if key != "params"
              and (key not in before or (before[key] is not value and not _same(before[key], value)))]
    return differ + [key for key in before if key not in group]


_IMMUTABLE = (int, float, bool, str, bytes, type(None), complex)
_ATOMS = frozenset(_IMMUTABLE)  # exactly these types (a subclass may hold more): nothing to copy, known at a glance


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, _IMMUTABLE) or (isinstance(value, tuple) and all(isinstance(v, _IMMUTABLE) for v in value)):
        return value  # nothing to copy (the common case: lr, betas, flags)
    return copy.deepcopy(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # == on tensors inside would not say
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if getattr(a, "shape", None) != getattr(b, "shape", None):  # arrays: == would broadcast one to the other
        return False
    try:
        equal = a == b  # an array's == compares elementwise
        return bool(equal.all()) if hasattr(equal, "all") else bool(equal)
    except (RuntimeError, TypeError, ValueError):  # other objects holding tensors: taken as changed
        return False


class GroupStateReplay:
    """The base optimizer's own group-level state (schedule-free optimizers count steps in ``param_groups``).

    The entries the base step itself changes (seen around the first pass's base step) are
    set back before each later pass's base step, and end as after the first pass's: one
    base step per Backforward step. An entry that a later pass would set to another value
    depends on the gradients the base step saw; such an optimizer cannot be split by
    stage, and the step raises. Entries the closure or a hook sets are the user's, left alone.
    torch.optim's own optimizers keep no group-level state: without step hooks, nothing to replay.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.start = [_group_entries(g) for g in optimizer.param_groups]  # for a rollback
        self.replays = not _keeps_no_group_state(optimizer)  # else a base step changes no entry: nothing to replay
        self.before: list[dict[str, Any]] = []
        self.changed: list[list[str]] = []
        self.after: list[dict[str, Any]] = []

    def before_update(self, j: int) -> None:
        """Called around each base step where ``replays``."""
        if j == 0:
            self.before = [_group_entries(g) for g in self.optimizer.param_groups]
        else:
            self._put(self.before, self.changed)

    def after_update(self, j: int) -> None:
        groups = self.optimizer.param_groups
        if j == 0:
            self.changed = [_changed_keys(before, g) for g, before in zip(groups, self.before, strict=True)]
            self.after = [{key: _copy(g[key]) for key in keys if key in g}
                          for g, keys in zip(groups, self.changed, strict=True)]
            return
        for i, (g, keys) in enumerate(zip(groups, self.changed, strict=True)):
            for key in keys:
                if not _same(g.get(key, _MISSING), self.after[i].get(key, _MISSING)):
                    raise ValueError(
                        f"the base optimizer {type(self.optimizer).__name__} sets param_groups[{i}][{key!r}] from the "
                        "gradients it sees in a step; Backforward updates one stage per pass and cannot split such "
                        "an optimizer (group-level state must not depend on the gradients)")

    def rollback(self) -> None:
        keys = [[key for key in {*g, *start} if key != "params"]
                for g, start in zip(self.optimizer.param_groups, self.start, strict=False)]
        self._put(self.start, keys)

    def _put(self, values: list[dict[str, Any]], keys: list[list[str]]) -> None:
        for g, saved, names in zip(self.optimizer.param_groups, values, keys, strict=False):
            for key in names:
                if key in saved:
                    g[key] = _copy(saved[key])
                else:  # set by the step: it was not there before
                    g.pop(key, None)


_MISSING = object()


def _keeps_no_group_state(optimizer: torch.optim.Optimizer) -> bool:
    """torch.optim's own step writes per-parameter state alone; a subclass of another module, a step hook, or
    a step set on the instance (a wrapper; an LR scheduler's, which only counts calls, aside) may write group
    entries."""
    hooks = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks,
             torch_optimizer._global_optimizer_pre_hooks, torch_optimizer._global_optimizer_post_hooks)
    own = vars(optimizer).get("step")
    return (type(optimizer).__module__.startswith("torch.optim.") and not any(hooks)
            and (own is None or hasattr(own, "_wrapped_by_lr_sched")))


class Rollback:
    """A copy of what a step moves, taken as it begins, to undo a step that fails.

    Every stage's parameters and base-optimizer state are copied at once before the first
    pass (one pass over them, not one per stage; a failed step puts back the values it began
    with, also where the closure changed a parameter in place before its stage moved). Memory:
    one copy of each, written into ``store`` and kept there from step to step (copying into the
    same tensors each step costs no allocation; a fresh copy of a large tensor each step costs
    page faults on a CPU).
    """

    def __init__(self, state: dict | None, store: dict[tuple[int, str | None], torch.Tensor]):
        self.state = state
        self.store = store
        self.params: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.states: list[tuple[torch.Tensor, dict | None]] = []

    def save(self, params: Sequence[torch.Tensor]) -> None:
        copies: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # slots and values
        for p in params:
            self.params.append((p, self._slot(p, None, p, copies)))
            if self.state is not None:
                saved = self.state.get(p)
                self.states.append((p, saved and {k: self._slot(p, k, v, copies) for k, v in saved.items()}))
        with torch.no_grad():
            for slots, values in copies.values():  # one call per device: on a GPU one launch, not one per tensor
                torch._foreach_copy_(slots, values)

    def restore(self) -> None:
        with torch.no_grad():
            for p, value in reversed(self.params):
                p.copy_(value)
        if self.state is not None:
            for p, saved in reversed(self.states):
                if saved is None:
                    self.state.pop(p, None)
                else:  # copies again: the store's tensors are overwritten by the next step
                    self.state[p] = {k: _copy(v) for k, v in saved.items()}  # an empty dict stays empty

    def _slot(self, p: torch.Tensor, key: str | None, value: Any,
              copies: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]]) -> Any:
        """Where ``value`` (parameter ``p`` itself, or its optimizer state ``key``) is kept: its slot in the store,
        to be copied into with the others on its device (``copies``); a copy, if it is no tensor."""
        if not isinstance(value, torch.Tensor):
            return _copy(value)
        device = value.device
        slot = self.store.get((id(p), key))
        if slot is None or slot.shape != value.shape or slot.dtype != value.dtype or slot.device != device:
            slot = self.store[(id(p), key)] = torch.empty_like(value)
        on_device = copies.get(device)
        if on_device is None:
            on_device = copies[device] = ([], [])
        on_device[0].append(slot)
        on_device[1].append(value)
        return slot
