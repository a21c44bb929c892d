"""One Backforward step: n passes, each computing one stage's gradient after the stages before it moved.

``backforward_step`` reads like the definition in ``reference.py``::

    for each pass j, updating stage k = order[j]:
        every pass sees the step's start: random numbers, buffers       Replay
        loss, G'_k = the pass (forward, backward restricted to stage k)  run_pass, StageGradients
        G'_k averaged over processes, unscaled (AMP), clipped            prepare_gradients
        θ_k ← base update with G'_k alone (all θ copied first)           update, Rollback

A pass is a function that computes the loss and its backward: the user's closure run
whole (the generic engine, any ``nn.Module``), or a fast pass that recomputes only what
changed (``graph.GraphEngine``). Whatever computes it, every parameter keeps its
``requires_grad`` in every pass, so each pass runs exactly the forward a plain step
runs, and the backward of pass k computes stage k's weight gradients alone.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .replay import GroupStateReplay, InputValues, Replay, Rollback
from .stages import Stage, data_flow_order, scan_graph

_autograd_backward = torch.autograd.backward  # the real one, while a closure runs with it intercepted

RunPass = Callable[[int, "StageGradients"], torch.Tensor]
"""run_pass(pass index, gradients) -> the pass's loss, its backward done through ``gradients``."""


@dataclass
class StepSetup:
    """Everything a step needs besides its passes (the optimizer builds one per step, the ICS meter too)."""

    stages: Sequence[Stage]
    order: list[int] | None                 # stage index updated in each pass; None: data flow, read in pass 1
    update: Callable[[Stage], None]         # moves one stage with its parameters' .grad
    modules: Sequence[nn.Module]            # the model's: every pass sees their buffers as the step began
    parameters: frozenset[int] = frozenset()  # ids of every parameter of the model (other leaves are the user's)
    inputs: Sequence[torch.Tensor] = ()     # step_batch's tensors: put back if the model modifies them in place
    copy_inputs: bool = False               # keep a copy of them to put back
    unheld: Sequence[nn.Parameter] = ()     # trainable parameters outside every stage: they get no gradient
    reverse: bool = False                   # with order None: update the last stage first
    check_order: bool = False               # order is the data flow read by an earlier step: OrderChanged if not
    optimizer: torch.optim.Optimizer | None = None  # its state and group-level state roll back with the step
    start_grads: dict[int, torch.Tensor] | None = None  # filled with G at θ_t for every stage (the ICS meter)
    reduce: Callable[[list[torch.Tensor]], None] | None = None  # averages tensors over processes, in place
    grad_scaler: Any = None                 # torch.amp.GradScaler
    scaler_views: dict[int, Any] = field(default_factory=dict)  # id(stage) -> what GradScaler.unscale_ reads
    scaler_before: dict[int, Any] = field(default_factory=dict)  # the GradScaler's stages when the step began
    max_grad_norm: float | None = None
    check_finite: bool = True
    rollback: bool = True
    rollback_store: dict = field(default_factory=dict)  # the rollback's copies, kept from step to step

    @property
    def adjusts_gradients(self) -> bool:
        """Whether ``prepare_gradients`` has anything to do (else G'_k is the pass's gradient as it stands)."""
        return (self.start_grads is not None or self.reduce is not None or self.grad_scaler is not None
                or self.max_grad_norm is not None)


class OrderChanged(Exception):
    """This step's data flow orders the stages otherwise than the order its fast passes were planned for (the
    loss uses other parameters, a child routes this batch elsewhere); raised by pass 1's backward, before any
    stage moved: the step is undone, to be run again reading the order."""


@dataclass
class StepResult:
    """What a step leaves behind."""

    losses: torch.Tensor                     # one per pass, in pass order, detached
    order: list[int]                         # the stage each pass updated
    measured_grads: dict[int, list[torch.Tensor | None]]  # stage -> G'_k before clipping (for the ICS meter)
    group_state_changed: bool = False        # the base step changed group-level entries (schedule-free counters)
    inputs_modified: bool = False            # the model modified step_batch's input in place
    skipped: bool = False                    # AMP: gradients held inf or NaN, so the step was undone


class StageGradients:
    """Which leaves each pass's backward computes, and what the closure then sees: stage k's gradient alone.

    The backward of pass k is restricted (``inputs=``) to stage k's parameters and to any
    tensor the user made require grad that is not a model parameter (an input for an
    adversarial example): autograd computes no other weight gradient and prunes
    everything below, without touching any ``requires_grad`` flag (flags change which
    kernels the forward runs). What a backward computes beyond that (the meter's pass, a
    reentrant checkpoint, a closure's own ``inputs=``) is moved aside before the closure
    can see it. A stage the forward does not use shows zero gradients to the closure
    (some torch utilities fail on a list of none) and gets no update.
    """

    def __init__(self, setup: StepSetup):
        self.stages = setup.stages
        self.order = setup.order
        self.reverse = setup.reverse
        self.check_order = setup.check_order
        self.unheld = setup.unheld
        self.parameters = setup.parameters
        self.start_grads = setup.start_grads
        self.scaler = setup.grad_scaler
        self.j = 0
        self.calls = 0
        self.meter = setup.start_grads is not None  # the meter's pass (the first, where G at θ_t is wanted)
        self.whole = False          # a reentrant checkpoint hides parameters: every backward runs whole
        self.user_leaves = False    # the closure backpropagates to tensors of its own: scan every call
        self.placeholders: set[int] = set()
        self.busy = False           # inside this pass's backward
        self.stage_params = [list(s.params) for s in setup.stages]

    def begin(self, j: int) -> None:
        self.j, self.calls = j, 0
        self.meter = j == 0 and self.start_grads is not None

    @property
    def k(self) -> int:
        assert self.order is not None
        return self.order[self.j]

    def where(self) -> str:
        if self.order is None:
            return f"pass {self.j + 1}"
        forward = self.order[::-1] if self.reverse else self.order
        return f"pass {self.j + 1} (stage {forward.index(self.k) + 1}, {self.stages[self.k].name!r})"

    def backward(self, tensors: Any, grad_tensors: Any = None, retain_graph: bool | None = None,
                 create_graph: bool = False, inputs: Any = None) -> None:
        """One backward call of the current pass, computing what the pass needs (or the caller's ``inputs``)."""
        if isinstance(tensors, torch.Tensor):  # the common case, without a generator
            roots, requires_grad = [tensors], tensors.requires_grad
        else:
            roots = [t for t in tensors if isinstance(t, torch.Tensor)]
            requires_grad = any(t.requires_grad for t in roots)
        if not requires_grad:
            raise RuntimeError(f"the loss does not require grad in {self.where()}: it was computed under "
                               "torch.no_grad(), detached, or from no trainable parameter")
        if inputs is None:
            wanted = self._inputs(roots)
        else:  # the closure names its own inputs: computed as asked, then other stages' set aside
            self._read_graph(roots)
            wanted = inputs
        if self.placeholders:
            self._drop_placeholders()  # this backward may reach the stage an earlier one did not
        kept = [(p, p.grad) for p in self.unheld] if wanted is None else []
        for p, _ in kept:
            p.grad = None  # else the whole backward accumulates into the user's gradient tensor in place
        self.busy = True  # a backward inside this one (a reentrant checkpoint's recomputation) is not the pass's
        try:
            _autograd_backward(tensors, grad_tensors, retain_graph, create_graph, inputs=wanted)
        finally:
            self.busy = False
            for p, g in kept:
                p.grad = g
        # Restricted to stage k, nothing else got a gradient: only a wider backward needs tidying up.
        self._show_stage_k_alone(others=wanted is None or inputs is not None or self.meter)

    def backward_loss(self, loss: torch.Tensor) -> None:
        """``step_batch``'s backward: of the loss scaled by the GradScaler, where one is given."""
        self.backward(self.scaler.scale(loss) if self.scaler is not None else loss)

    def intercepting_backward(self) -> _Routing:
        """While a closure runs, its ``backward()`` calls in this thread go through ``self.backward``."""
        return _Routing(_ROUTER, self)

    def finish(self, loss: object) -> int:
        """The stage this pass updates, once the pass's loss is checked."""
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"the closure must return the loss tensor; it returned {type(loss).__name__} "
                            f"in {self.where()}")
        if loss.numel() != 1:
            raise ValueError(f"the loss must be a scalar; got shape {tuple(loss.shape)} in {self.where()}")
        if self.calls == 0:  # gradients set by hand (torch.autograd.grad), or none at all
            if not any(p.grad is not None for s in self.stages for p in s.params):
                raise RuntimeError(f"the closure did not call backward() in {self.where()}")
            if self.order is None:
                if not loss.requires_grad:
                    raise RuntimeError("the stage order is read from the loss's graph: return the loss undetached "
                                       "or pass stages=[...] in forward order")
                self._read_graph([loss])
            self.calls = 1
            self._show_stage_k_alone(others=True)
        if self.placeholders:
            self._drop_placeholders()  # an unused stage: no gradient, no update
        return self.k

    def _drop_placeholders(self) -> None:
        """Take back the zeros shown for stage k where no backward reached it: when the pass ends, and before
        another backward of the pass (a forward hook's first, then the loss's), which would add into them in place
        and leave a gradient that looked unused."""
        for p in self.stages[self.k].params:
            if id(p.grad) in self.placeholders:
                p.grad = None
        self.placeholders.clear()

    def _read_graph(self, roots: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scan the graph where needed: the stage order (first call of the step) and tensors of the user's."""
        first = self.j == 0 and self.calls == 0
        self.calls += 1
        if not (first or self.user_leaves):
            return []
        reading = first and (self.order is None or self.check_order)
        scan = scan_graph(roots, first_use=reading)  # the order is read by the first call, if at all
        if first:
            self.whole = scan.hides_parameters
            if reading:
                if scan.hides_parameters:
                    raise ValueError("a reentrant checkpoint (torch.utils.checkpoint with use_reentrant=True) hides "
                                     "its parameters from the autograd graph, so their data-flow order cannot be "
                                     "read: pass stages=[...] in forward order, or use use_reentrant=False")
                forward = data_flow_order(self.stages, scan)
                order = forward[::-1] if self.reverse else forward
                if self.order is not None and order != self.order:
                    raise OrderChanged
                self.order = order
        own = [leaf for key, leaf in scan.leaves.items() if key not in self.parameters]
        self.user_leaves = self.user_leaves or bool(own)
        return own

    def _inputs(self, roots: list[torch.Tensor]) -> list[torch.Tensor] | None:
        own = self._read_graph(roots)
        if self.whole:
            return None
        if self.meter:
            return [p for s in self.stages for p in s.params] + own
        return [*self.stage_params[self.k], *own] if own else self.stage_params[self.k]

    def _show_stage_k_alone(self, others: bool) -> None:
        """Move other stages' gradients aside (into G for the meter); a stage with none shows zeros."""
        meter = self.meter
        k = self.k
        for i, stage in enumerate(self.stages if others else ()):
            if i == k:
                continue
            for p in stage.params:
                if p.grad is None:
                    continue
                if meter and self.start_grads is not None:
                    held = self.start_grads.get(id(p))
                    self.start_grads[id(p)] = p.grad if held is None else held + p.grad
                p.grad = None
        mine = self.stages[k].params
        for p in mine:
            if p.grad is not None:
                return
        for p in mine:
            p.grad = torch.zeros_like(p)
            self.placeholders.add(id(p.grad))


class _BackwardRouter:
    """Sends each thread's ``torch.autograd.backward`` calls to the StageGradients whose pass that thread runs.

    ``Tensor.backward()`` calls ``torch.autograd.backward``: while any pass of any thread is
    running, that name is this router (counted, so that steps in several threads do not put
    back each other's), and each thread keeps its own stack of running passes. Calls from a
    thread with no pass running, from inside a pass's backward (a reentrant checkpoint's
    recomputation) or with the deprecated ``grad_variables`` pass through to what the name held
    before. Others' patches of the name: one made over the router stays when the last pass
    ends (the router inside it passes through); one that put back what it had found (the
    router's find, or torch's own) is covered again by the next pass; a wrapper around the
    router, taken for what the name held, does not recurse (the router inside calls torch's own).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0            # passes running, all threads together
        self.installed = False      # the router is the name, or inside a patch made over it
        self.found: Callable[..., Any] = _autograd_backward  # what torch.autograd.backward was when installed
        self.local = threading.local()

        @functools.wraps(_autograd_backward)
        def backward(tensors: Any, grad_tensors: Any = None, retain_graph: bool | None = None,
                     create_graph: bool = False, grad_variables: Any = None, inputs: Any = None) -> None:
            local = self.local.__dict__
            stack = local.get("stack")
            if stack and not stack[-1].busy and grad_variables is None:
                return stack[-1].backward(tensors, grad_tensors, retain_graph, create_graph, inputs)
            passing = local.get("passing", False)
            local["passing"] = True
            try:
                return (_autograd_backward if passing else self.found)(
                    tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs)
            finally:
                local["passing"] = passing

        self.backward = backward

    def enter(self, gradients: StageGradients) -> None:
        with self.lock:
            now = torch.autograd.backward
            # Not in place: the first pass, or another's patch put back what it had found (ours, or torch's own).
            if now is not self.backward and (not self.installed or now is self.found or now is _autograd_backward):
                self.found, self.installed = now, True
                torch.autograd.backward = self.backward
            self.running += 1
        self.local.__dict__.setdefault("stack", []).append(gradients)

    def exit(self) -> None:
        self.local.stack.pop()
        with self.lock:
            self.running -= 1
            # Put back only what is still ours: a patch made over it since stays, with us inside it.
            if self.running == 0 and torch.autograd.backward is self.backward:
                torch.autograd.backward, self.installed = self.found, False


class _Routing:
    """A pass's ``with``: its thread's backward calls go to its StageGradients meanwhile."""

    __slots__ = ("router", "gradients")

    def __init__(self, router: _BackwardRouter, gradients: StageGradients):
        self.router, self.gradients = router, gradients

    def __enter__(self) -> None:
        self.router.enter(self.gradients)

    def __exit__(self, *exc: object) -> None:
        self.router.exit()


_ROUTER = _BackwardRouter()


def closure_pass(closure: Callable[[], torch.Tensor]) -> RunPass:
    """The generic engine's pass: the user's closure, run whole, its backward restricted to stage k."""
    def run(_j: int, gradients: StageGradients) -> torch.Tensor:
        with gradients.intercepting_backward():
            return closure()

    return run


def batch_pass(model: nn.Module, inputs: Any, targets: Any,
               loss_fn: Callable[[Any, Any], torch.Tensor]) -> RunPass:
    """The generic engine's pass for ``step_batch``: the whole forward, backward restricted to stage k."""
    def run(_j: int, gradients: StageGradients) -> torch.Tensor:
        with gradients.intercepting_backward():  # a backward inside the forward (a hook's) is the pass's
            loss = loss_fn(model(inputs), targets)
        gradients.backward_loss(loss)
        return loss

    return run


def backforward_step(setup: StepSetup, run_pass: RunPass, *, keep: bool = True) -> StepResult:
    """One Backforward step; with ``keep=False`` everything is put back afterwards (a measurement)."""
    stages = setup.stages
    params = [p for s in stages for p in s.params]
    grads_before = [p.grad for p in params]
    for p in params:
        p.grad = None  # gradients left from before the step are not part of it
    gradients = StageGradients(setup)
    inputs = InputValues(setup.inputs, setup.copy_inputs) if setup.inputs else None
    replay = Replay(setup.modules, inputs)
    undo = Rollback(setup.optimizer.state if setup.optimizer is not None else None, setup.rollback_store)
    groups = GroupStateReplay(setup.optimizer) if setup.optimizer is not None else None
    replaying = groups is not None and groups.replays  # else no base step changes a group entry
    used: dict[int, list[torch.Tensor | None]] = {}
    measured: dict[int, list[torch.Tensor | None]] = {}
    losses: list[torch.Tensor] = []  # on the loss's device: no host read in between
    finite_grads: list[torch.Tensor] = []
    skipped = False
    try:
        if setup.rollback or not keep or setup.grad_scaler is not None:
            undo.save(params)
        for j in range(len(stages)):
            replay.before_pass(j)
            _forget_autocast_casts()
            gradients.begin(j)
            with torch.enable_grad():  # as LBFGS runs its closure: a step inside no_grad() still trains
                loss = run_pass(j, gradients)
            k = gradients.finish(loss)
            replay.after_pass(j)
            stage = stages[k]
            value = loss.detach().reshape(1)
            if setup.reduce is not None:
                value = value.clone()  # averaged in place with the gradients
            del loss  # the parts of its graph the restricted backward did not run would live on into the next pass
            losses.append(value)
            if setup.adjusts_gradients:
                measured[k] = prepare_gradients(setup, stage, value, meter=j == 0, finite=finite_grads)
            if replaying:
                groups.before_update(j)
            setup.update(stage)
            if replaying:
                groups.after_update(j)
            used[k] = [p.grad for p in stage.params]
            for p in stage.params:
                p.grad = None  # later passes and base steps must not see it
        replay.finish()
        values = torch.cat(losses) if losses else torch.zeros(0)
        skipped = _check_finite(setup, gradients, values, finite_grads)
        if skipped or not keep:
            undo.restore()
            if groups is not None:
                groups.rollback()
        if not keep:
            replay.rollback()
    except BaseException:
        if setup.rollback:
            undo.restore()
            if groups is not None:
                groups.rollback()
        replay.rollback()
        for p, g in zip(params, grads_before, strict=True):
            p.grad = g
        raise
    finally:
        _forget_autocast_casts()
        if not setup.rollback:  # copies an AMP skip or a measurement took: not kept between steps
            setup.rollback_store.clear()
    if keep:
        for k, grads in used.items():
            for p, g in zip(stages[k].params, grads, strict=True):
                p.grad = g
    else:
        for p, g in zip(params, grads_before, strict=True):
            p.grad = g
    assert gradients.order is not None
    changed = groups is not None and any(groups.changed)
    return StepResult(values, list(gradients.order), measured, changed, inputs is not None and inputs.modified,
                      skipped)


def _forget_autocast_casts() -> None:
    """A step run inside an autocast region: autocast keeps its casts of the weights until the region ends, so
    each pass (and what the region runs after the step) would see weights cast before they moved, and pass 1's
    graph would show a cast made earlier (the model's reading, say) as a weight's first use."""
    torch.clear_autocast_cache()


def prepare_gradients(setup: StepSetup, stage: Stage, loss: torch.Tensor, *, meter: bool,
                      finite: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Average G'_k (and the pass loss) over processes, unscale it (AMP), clip it; returns it as before clipping.

    In the meter's pass (the first, with ``start_grads``) the other stages' G at θ_t go
    through the same all-reduce and unscaling, and a stage without a gradient counts zero.
    """
    start = setup.start_grads if meter else None
    others: list[torch.Tensor] = []
    if start is not None:
        for s in setup.stages:
            if s is not stage:
                for p in s.params:
                    if id(p) not in start:
                        start[id(p)] = torch.zeros_like(p)
                    others.append(start[id(p)])
    if setup.reduce is not None:
        _average(setup.reduce, stage.params, loss, others)
    if setup.grad_scaler is not None:
        _refuse_unscaled_by_the_closure(setup)
        setup.grad_scaler.unscale_(setup.scaler_views[id(stage)])
        present = [p.grad for p in stage.params if p.grad is not None]
        if present:
            finite.append(torch.stack([torch.isfinite(g).all() for g in present]).all())
        if others:
            # The reciprocal of the scale the closure's scale() used, as GradScaler.unscale_ multiplies stage k's
            # gradients by (it divides in float64 first: the same float32, as double rounding of a quotient
            # through 53 bits is exact for 24-bit operands).
            inverse = setup.grad_scaler._scale.reciprocal()
            for g in others:
                g.mul_(inverse)
    clip = setup.max_grad_norm is not None
    grads = [p.grad for p in stage.params]
    if setup.start_grads is not None and clip:  # the meter compares gradients before clipping
        grads = [None if g is None else g.clone() for g in grads]
    if start is not None:
        for p, g in zip(stage.params, grads, strict=True):
            start[id(p)] = torch.zeros_like(p) if g is None else g
    if clip:
        present = [p for p in stage.params if p.grad is not None]
        if present:
            torch.nn.utils.clip_grad_norm_(present, setup.max_grad_norm)
    return grads


def scaler_stages(scaler: Any) -> dict[int, Any]:
    """Where an enabled GradScaler stands with each optimizer it saw since its last ``update()``, by id."""
    return {key: state["stage"] for key, state in scaler._per_optimizer_states.items()}


def _refuse_unscaled_by_the_closure(setup: StepSetup) -> None:
    """``scaler.unscale_(optimizer)`` in the closure (or before the step) would unscale twice: say so instead.
    Other optimizers the scaler had unscaled or stepped before this step began (a GAN's) are the user's."""
    ours = {id(view) for view in setup.scaler_views.values()}
    now = scaler_stages(setup.grad_scaler)
    if any(key not in ours and stage is not setup.scaler_before.get(key) for key, stage in now.items()):
        raise RuntimeError("with grad_scaler=, Backforward unscales each pass's gradients itself: do not call "
                           "scaler.unscale_() or scaler.step() on it, in the closure or before the step; clip with "
                           "max_grad_norm=")


def _average(reduce: Callable[[list[torch.Tensor]], None], params: Sequence[nn.Parameter],
             loss: torch.Tensor, extra: list[torch.Tensor]) -> None:
    """One all-reduce: stage k's gradients (zeros where this process has none), ``extra``, the loss, and
    which parameters had a gradient, so that a parameter no process used keeps none."""
    missing = {id(p) for p in params if p.grad is None}
    for p in params:
        if id(p) in missing:
            p.grad = torch.zeros_like(p)
    present = loss.new_tensor([id(p) not in missing for p in params])
    reduce([*(p.grad for p in params), *extra, loss, present])
    if missing:  # a host read only where this process saw an unused parameter
        for p, seen in zip(params, present.tolist(), strict=True):
            if id(p) in missing and seen == 0:
                p.grad = None


def _check_finite(setup: StepSetup, gradients: StageGradients, losses: torch.Tensor,
                  finite_grads: list[torch.Tensor]) -> bool:
    """The step's one host read: are the losses (and, with a GradScaler, the gradients) finite?

    Returns whether an AMP step must be skipped; raises for a non-finite loss without one.
    """
    if setup.grad_scaler is not None:
        finite = torch.isfinite(losses).all()
        if finite_grads:
            finite = finite & torch.stack(finite_grads).all()
        return not bool(finite)  # skipped, as GradScaler.step skips it; scaler.update() then lowers the scale
    # A sum is finite only where every term is (a finite sum that overflows is looked at term by term).
    if not setup.check_finite or math.isfinite(losses.sum().item()) or torch.isfinite(losses).all().item():
        return False
    bad = next(j for j, v in enumerate(losses.tolist()) if not math.isfinite(v))
    gradients.j = bad
    undone = "; the step was undone" if setup.rollback else "; the stages before it were already updated"
    raise FloatingPointError(f"non-finite loss {losses[bad].item()} in {gradients.where()}{undone}")
