"""``Backforward``: a torch optimizer that wraps any other and updates stages one after another."""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from . import distributed
from .engines import (
    OrderChanged,
    RunPass,
    StepResult,
    StepSetup,
    backforward_step,
    batch_pass,
    closure_pass,
    scaler_stages,
)
from .graph import GraphEngine, ModelGraph, Refusal, global_hooks, model_graph, plain_sequential, settings_of
from .ics import ICSReport, gradient_shift
from .replay import InputModified
from .stages import Stage, StageSpec, find_stages, parameter_names

_GRAPHS_KEPT = 8  # graphs of one model read with different settings, kept to be used again

ORDERS = ("forward", "reverse")


class Backforward(torch.optim.Optimizer):
    r"""Backforward Propagation (Stoica & Simionescu, AAAI 2023) over a base torch optimizer.

    The model is split into stages :math:`S_1, \dots, S_n` in forward order. Where a plain
    step computes every gradient at :math:`\theta_t` (Jacobi style), a Backforward step
    computes each stage's gradient after the stages before it have moved (Gauss-Seidel):

    .. math::
        \begin{aligned}
            &\textbf{for}\ k = 1 \dots n: \\
            &\quad G'_k = \nabla_{\theta_k} L(\theta'_1, \dots, \theta'_{k-1}, \theta_k, \dots, \theta_n) \\
            &\quad \theta'_k = \mathrm{BaseUpdate}(\theta_k, G'_k) \quad \text{(only stage } k \text{ moves)}
        \end{aligned}

    so no stage is updated for inputs it no longer sees: internal covariate shift is
    removed. Every pass sees the random numbers (dropout masks), buffers and group-level
    optimizer state the step started with; afterwards they are as after the first pass.
    After the step each stage's ``.grad`` is the gradient it was updated with. A step that
    raises leaves parameters, optimizer state, buffers and random number generators as
    they were before it.

    Args:
        model: the model whose parameters ``optimizer`` holds.
        optimizer: a ``torch.optim.Optimizer`` whose step needs no closure; in pass k its
            ``param_groups`` hold stage k's parameters alone, so it updates only them and
            keeps its per-parameter state as usual.
        stages: ``"module"`` (default: one stage per module that directly owns trainable
            parameters), ``"child"`` (one per top-level child), ``"depth:N"`` (grouped by the
            first N parts of the owning module's name), each ordered by data flow; or a list
            of modules or parameter lists, in forward order. Frozen parameters are never a stage.
        order: ``"forward"`` (the paper) or ``"reverse"`` (last stage first: keeps the shift).
        track_ics: compute the plain gradients :math:`G_k` in the first pass and fill
            ``last_report`` with ‖G_k − G'_k‖, cos∠(G_k, G'_k) and ‖G_k‖ per stage.
        max_grad_norm: clip each stage's gradient :math:`G'_k` to this norm before its update
            (per stage: no global norm exists when stage 1 moves). Clipping inside a closure
            means the same, since the closure sees stage k's gradient alone.
        grad_scaler: a ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` the closure
            calls; each pass's gradient is unscaled before its update, and a step whose
            gradients hold inf or NaN is undone (as ``GradScaler.step`` skips it). Call
            ``grad_scaler.update()`` after each step.
        check_finite: raise ``FloatingPointError`` (the step undone) if a pass loss is not
            finite; costs one host-device synchronisation per step.
        rollback: copy the stages' parameters and optimizer state as each step begins, so a
            step that fails is undone (the copies, one of each, are kept from step to step).
        process_group: average each stage's gradients over this ``torch.distributed``
            group after each pass (default: the world group when initialised).
        check_replicas: after each step, compare parameter checksums across processes and
            raise if they differ (default: on when ``TORCH_DISTRIBUTED_DEBUG`` is set).

    The wrapper shares the base optimizer's ``param_groups`` and ``state``, so LR
    schedulers, ``state_dict``, ``zero_grad`` and ``add_param_group`` work unchanged.
    ``step(closure)`` calls the closure (compute the loss, call ``backward()``, return the
    loss) once per stage and returns the first pass's loss; ``step_batch(inputs, targets,
    loss_fn)`` gives the same result, fast on an ``nn.Sequential`` or any model ``torch.fx``
    traces (``graph.py``). Both are one optimizer step to step hooks and schedulers; the
    base optimizer's own step runs (and fires its hooks) once per pass.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, stages: StageSpec = None,
                 order: str = "forward", *, track_ics: bool = False, max_grad_norm: float | None = None,
                 grad_scaler: Any = None, check_finite: bool = True, rollback: bool = True,
                 process_group: Any = None, check_replicas: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, not {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
        if isinstance(optimizer, Backforward):
            raise TypeError("optimizer is already a Backforward; wrap the base optimizer once")
        if _step_needs_closure(optimizer):
            raise TypeError(f"{type(optimizer).__name__}.step needs a closure and re-evaluates the loss itself; "
                            "Backforward calls the base step once per stage without one")
        _check_order(order)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, not {type(grad_scaler).__name__}")
        meta = [name for name, p in model.named_parameters() if p.is_meta]
        if meta:
            raise ValueError(f"the model's parameters are on the meta device (no data), e.g. {meta[0]}; "
                             "materialise them first (model.to_empty(device=...) and initialise)")
        self.model = model
        self.base_optimizer = optimizer
        self.order = order
        self.track_ics = track_ics
        self.max_grad_norm = max_grad_norm
        self.grad_scaler = grad_scaler
        self.check_finite = check_finite
        self.rollback = rollback
        self.process_group = process_group
        self.check_replicas = check_replicas
        self.last_report: ICSReport | None = None
        self.last_step_skipped = False
        self._last_losses = torch.zeros(0)
        # Lists of parameters are read once: a generator would be empty when stages are found again.
        self._stage_spec = stages if stages is None or isinstance(stages, str) else [
            item if isinstance(item, (nn.Module, torch.Tensor)) else list(item) for item in stages]
        self._plan: _Plan | None = None
        self._graphs: dict[tuple, ModelGraph | None] = {}  # the model read as a graph, per module structure
        self._engine = "generic"                            # the engine the last step ran
        self._check_held(optimizer.param_groups)
        self._current_plan()  # bad stages raise here, before any step
        self._initialising = True
        super().__init__([p for g in optimizer.param_groups for p in g["params"]], dict(optimizer.defaults))
        self._initialising = False

    # The base optimizer's groups and state, always (also after base.load_state_dict replaced them):
    # schedulers and checkpoints see one set. Optimizer.__init__'s own assignments are ignored.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        if not self._initialising:
            self.base_optimizer.param_groups = groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.base_optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        if not self._initialising:
            self.base_optimizer.state = state

    @property
    def stages(self) -> list[Stage]:
        """The stages in forward order (named granularities: the order of the last step's data flow)."""
        return list(self._current_plan().stages)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def last_losses(self) -> list[float]:
        """The loss of each pass of the last step: pass k's is the batch loss after stages 1..k-1 moved."""
        return self._last_losses.tolist()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One Backforward step; ``closure`` computes the loss, calls ``backward()`` and returns the loss."""
        if closure is None:
            raise TypeError("Backforward.step needs a closure that computes the loss, calls backward() and returns "
                            "the loss, as for torch.optim.LBFGS (or use step_batch); with a GradScaler, pass "
                            "grad_scaler= to Backforward and call step(closure), not scaler.step(optimizer)")
        if isinstance(closure, _Batch):
            return self._run_batch(closure.inputs, closure.targets, closure.loss_fn).losses[0]
        self._engine = "generic"
        modules = list(self.model.modules())  # walked once per step: the plan's key, the buffers to replay
        plan = self._current_plan(modules)
        loss = self._run(plan, closure_pass(closure), modules, follow_graph=True).losses[0]
        plan.order_read_with = None  # an order this closure's forward gave: step_batch reads its own again
        return loss

    def step_batch(self, inputs: Any, targets: Any,
                   loss_fn: Callable[[Any, Any], torch.Tensor]) -> torch.Tensor:
        """One step on a batch: ``step`` with the closure ``loss_fn(model(inputs), targets).backward()``."""
        return self.step(_Batch(inputs, targets, loss_fn))

    def _held_between_passes(self) -> list[torch.Tensor]:
        """Values the fast engine keeps from one pass for later ones (for memory accounting)."""
        plan = self._plan
        assert plan is not None  # found at construction
        return [t for engine in plan.engines.values() for t in engine.kept_tensors()]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._initialising:  # Optimizer.__init__ adding the base optimizer's groups again
            return
        self.base_optimizer.add_param_group(param_group)  # stages are found again next step
        self._check_held(self.base_optimizer.param_groups)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)

    # ---- the step ----

    def _run_batch(self, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], torch.Tensor], *,
                   keep: bool = True, capturing: bool = False) -> StepResult:
        modules = list(self.model.modules())  # walked once per step: the plan's and graph's keys, the buffers
        plan = self._current_plan(modules)
        tensors = _tensors(inputs)
        fast = self._fast(plan, inputs, tensors, modules)
        run_pass = (fast.make_pass(inputs, targets, loss_fn) if fast is not None
                    else batch_pass(self.model, inputs, targets, loss_fn))
        self._engine = fast.kind if fast is not None else "generic"
        try:
            result = self._run(plan, run_pass, modules, follow_graph=fast is None, keep=keep, capturing=capturing,
                               inputs=tensors)
        except OrderChanged:  # undone before any stage moved: the generic engine runs it again, reading the order
            self._engine = "generic"
            result = self._run(plan, batch_pass(self.model, inputs, targets, loss_fn), modules, follow_graph=True,
                               keep=keep, capturing=capturing, inputs=tensors)
        if tensors and not capturing:
            plan.inputs_modified = result.inputs_modified or (plan.inputs_modified is True)
        return result

    def _run(self, plan: _Plan, run_pass: RunPass, modules: list[nn.Module], follow_graph: bool, *, keep: bool = True,
             capturing: bool = False, inputs: Sequence[torch.Tensor] = ()) -> StepResult:
        """One step (``keep=False``: undone afterwards); ``capturing``: inside a CUDA graph capture, nothing may
        read the host, so no rollback copy, finiteness check or group-level state replay (``cuda_graphs``)."""
        _check_order(self.order)
        reverse = self.order == "reverse"
        forward = list(range(len(plan.stages)))
        scaler = self._scaler()
        reduce = self._reducer()
        setup = StepSetup(
            stages=list(plan.stages), parameters=plan.parameters,
            # Named stages follow this step's data flow, read from its first pass (a fast pass: known, checked).
            order=None if self._named_stages and follow_graph else (forward[::-1] if reverse else forward),
            reverse=reverse, update=plan.update, modules=modules, unheld=plan.unheld,
            optimizer=None if capturing else self.base_optimizer, start_grads={} if self.track_ics else None,
            reduce=reduce, grad_scaler=scaler, scaler_views=plan.scaler_views,
            scaler_before=self._others_scaled(scaler),
            max_grad_norm=self.max_grad_norm, check_finite=self.check_finite and not capturing,
            rollback=self.rollback and not capturing, inputs=inputs,
            # Not across processes: a rank running again alone would meet the others' all-reduces in another order.
            check_order=self._named_stages and not follow_graph and not capturing and reduce is None,
            copy_inputs=plan.inputs_modified is not False and not capturing, rollback_store=plan.rollback_store)
        try:
            result = backforward_step(setup, run_pass, keep=keep)
        except InputModified:
            plan.inputs_modified = None  # found out without a copy to put back: keep one from now on
            raise
        in_forward = result.order[::-1] if reverse else result.order
        plan.stages = [setup.stages[k] for k in in_forward]
        plan.ordered = True
        if not keep:
            return result
        self._last_losses = result.losses
        self.last_step_skipped = result.skipped
        self._check_replicas(plan)
        if self.track_ics:
            self.last_report = _ics_report(setup, result, in_forward)
        return result

    def _group_state_changes(self, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], torch.Tensor]) -> bool:
        """Whether the base optimizer's step changes group-level entries (a step run and undone to see)."""
        return self._run_batch(inputs, targets, loss_fn, keep=False).group_state_changed

    def _reducer(self) -> Callable[[list[torch.Tensor]], None] | None:
        return distributed.grad_averager(self.process_group)

    def _scaler(self) -> Any:
        return self.grad_scaler if self.grad_scaler is not None and self.grad_scaler.is_enabled() else None

    def _others_scaled(self, scaler: Any) -> dict[int, Any]:
        """What the GradScaler did with other optimizers before this step (a GAN's other one); an unscale of
        this optimizer or its base, before the step as in the closure, is refused: it would unscale twice."""
        if scaler is None:
            return {}
        ours = (id(self), id(self.base_optimizer))
        return {key: stage for key, stage in scaler_stages(scaler).items() if key not in ours}

    def _fast(self, plan: _Plan, inputs: Any, tensors: Sequence[torch.Tensor],
              modules: list[nn.Module]) -> GraphEngine | None:
        """The fast engine for this plan and order, once the forward order is known and the model reads as a graph.

        Not for an input that requires grad (every pass's backward reaches it in the definition), not on
        the first step with a newly traced graph (its branches may order the stages otherwise), and, with
        named stages, not on the first after a ``step(closure)`` (its closure's forward gave the order): the
        generic engine runs those, reading the order.
        """
        graph = self._graph(inputs, modules) if not any(t.requires_grad for t in tensors) else None
        known = plan.ordered and graph is not None and (
            plan.order_read_with is graph or (graph.kind == "chain" and not self._named_stages))
        plan.order_read_with = graph
        if not known:
            return None
        forward = list(range(len(plan.stages)))
        order = tuple(forward[::-1] if self.order == "reverse" else forward)
        key = (id(graph), tuple(id(s) for s in plan.stages), order)
        engine = plan.engines.get(key)
        if engine is None or engine.stale():
            engine = plan.engines[key] = GraphEngine(graph, plan.stages, order)
        return engine

    def _graph(self, inputs: Any, modules: list[nn.Module]) -> ModelGraph | None:
        """The model as a graph of calls (traced again when a module's mode, plain attributes, hooks or buffers
        change: a buffer registered or set in a first forward, say); None, said once, where it cannot be read."""
        model = self.model
        # A traced graph fixed the Python branches a module's mode or hooks took; the reading of either kind
        # (probe) found no state kept with the flags of then, and the parameters each call reads.
        hooked = bool(model._forward_hooks or model._forward_pre_hooks or global_hooks())
        chain = plain_sequential(model)
        key = (hooked, torch.get_default_dtype(),  # the dtype of a factory's tensor made while tracing
               tuple((id(m), settings_of(m, chain=chain), bool(m._forward_hooks or m._forward_pre_hooks),
                      tuple(b is None for b in m._buffers.values()) if m._buffers else ())  # set by a forward
                     for m in modules))
        if key not in self._graphs:
            if len(self._graphs) >= _GRAPHS_KEPT:  # settings that change every step (a rate a user anneals)
                self._forget(self._graphs.pop(next(iter(self._graphs))))
            try:
                self._graphs[key] = model_graph(self.model, inputs)
            except Refusal as reason:
                self._graphs[key] = None
                if not any(g is None for k, g in self._graphs.items() if k != key):
                    warnings.warn(f"backforward: step_batch runs the generic engine on {type(self.model).__name__}: "
                                  f"{reason}", stacklevel=_outside_this_package(sys._getframe()))
        return self._graphs[key]

    def _forget(self, graph: ModelGraph | None) -> None:
        """Drop a graph's engines (their values kept from the last step with it, and an id a new graph may reuse)."""
        if graph is not None and self._plan is not None:
            self._plan.engines = {key: e for key, e in self._plan.engines.items() if e.graph is not graph}

    def _current_plan(self, modules: list[nn.Module] | None = None) -> _Plan:
        """The stages of the parameters held now that require grad; found again when that set changes, or the
        model's parameters do (a layer replaced: the optimizer may hold parameters the model no longer has)."""
        groups = self.base_optimizer.param_groups
        key = (tuple(tuple(id(p) for p in g["params"] if p.requires_grad) for g in groups),
               tuple(id(p) for m in modules or self.model.modules() for p in m._parameters.values()))
        if self._plan is None or self._plan.key != key:
            self._check_held(groups, trainable_only=True)  # groups added to the base optimizer itself come here first
            trainable = [p for g in groups for p in g["params"] if p.requires_grad]
            if not trainable:
                raise ValueError("the optimizer holds no trainable parameters (all are frozen)")
            if any(is_lazy(p) for p in trainable):  # no shape yet: nothing to copy for the rollback, no stage order
                raise ValueError("the model has parameters that are not initialized yet (a lazy module such as "
                                 "nn.LazyLinear): run one forward pass first")
            stages = find_stages(self.model, trainable, self._stage_spec)
            held = {id(p) for g in groups for p in g["params"]}
            unheld = [p for p in self.model.parameters() if p.requires_grad and id(p) not in held]
            ordered = not self._named_stages
            self._plan = _Plan(key, stages, ordered, unheld, StageUpdate(self.base_optimizer, stages),
                               {id(s): _GradView(s.params) for s in stages},
                               frozenset(parameter_names(self.model)))
        return self._plan

    @property
    def _named_stages(self) -> bool:
        """Stages found by a granularity ("module", "child", "depth:N"): their order is the data flow, read."""
        return self._stage_spec is None or isinstance(self._stage_spec, str)

    def _check_held(self, groups: list[dict[str, Any]], trainable_only: bool = False) -> None:
        names = parameter_names(self.model)
        for i, p in enumerate(p for g in groups for p in g["params"]):
            if id(p) not in names and (p.requires_grad or not trainable_only):
                raise ValueError(f"optimizer parameter #{i} (shape {tuple(p.shape)}) is not a parameter of the model")

    def _check_replicas(self, plan: _Plan) -> None:
        check = self.check_replicas if self.check_replicas is not None else distributed.debug_mode()
        if check:
            distributed.check_replicas([p for s in plan.stages for p in s.params], self.process_group)


@dataclass
class _Batch:
    """``step_batch``'s arguments, carried through ``step`` so that hooks and schedulers see one step."""

    inputs: Any
    targets: Any
    loss_fn: Callable[[Any, Any], torch.Tensor]


class StageUpdate:
    """The base optimizer's step over one stage's parameters alone: meanwhile its param_groups hold only them."""

    def __init__(self, optimizer: torch.optim.Optimizer, stages: Sequence[Stage]):
        self.optimizer = optimizer
        self.params: dict[int, list[list[torch.Tensor]]] = {}
        for s in stages:
            mine = {id(p) for p in s.params}
            self.params[id(s)] = [[p for p in g["params"] if id(p) in mine] for g in optimizer.param_groups]

    def __call__(self, stage: Stage) -> None:
        groups = self.optimizer.param_groups
        mine = self.params[id(stage)]
        if len(groups) != len(mine):
            raise ValueError(f"the base optimizer has {len(groups)} parameter groups where the step began with "
                             f"{len(mine)}: add parameter groups between steps, not in the closure")
        everything = [g["params"] for g in groups]
        try:
            for g, params in zip(groups, mine, strict=True):
                g["params"] = params
            self.optimizer.step()
        finally:
            for g, params in zip(groups, everything, strict=True):
                g["params"] = params


class _GradView:
    """What ``GradScaler.unscale_`` reads of an optimizer (its param_groups), for one stage's gradients."""

    def __init__(self, params: Iterable[torch.Tensor]):
        self.param_groups = [{"params": list(params)}]


@dataclass
class _Plan:
    key: tuple                              # the trainable parameters held, per group
    stages: list[Stage]                     # in forward order once ``ordered``
    ordered: bool                           # explicit stages, or data flow read by a step
    unheld: list[nn.Parameter]              # trainable model parameters the optimizer does not hold
    update: StageUpdate
    scaler_views: dict[int, _GradView]
    parameters: frozenset[int]              # ids of every parameter of the model
    inputs_modified: bool | None = None     # whether the model modifies step_batch's input (None: not known yet)
    engines: dict[tuple, GraphEngine] = field(default_factory=dict)
    order_read_with: ModelGraph | None = None  # the graph of the step that last read or used the stage order
    rollback_store: dict = field(default_factory=dict)  # where each step's rollback copies what it moves


def _ics_report(setup: StepSetup, result: StepResult, in_forward: Sequence[int]) -> ICSReport:
    """Per stage in forward order; ``setup.stages`` is the list the step's indices refer to."""
    assert setup.start_grads is not None
    measured = torch.stack([gradient_shift([setup.start_grads[id(p)] for p in setup.stages[k].params],
                                           result.measured_grads[k]) for k in in_forward]).tolist()
    losses = result.losses.tolist()
    return ICSReport([setup.stages[k].name for k in in_forward], [losses[result.order.index(k)] for k in in_forward],
                     [m[0] for m in measured], [m[1] for m in measured], [m[2] for m in measured])


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a batch: a tensor, or tuples, lists and dicts of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _outside_this_package(frame: Any) -> int:
    """The stack level, counted from ``frame`` (the one calling ``warnings.warn``: level 1), of the first frame
    outside backforward and torch.optim (for a warning to point at the user's call)."""
    inside = tuple(os.path.join(os.path.dirname(path), "") for path in (__file__, torch.optim.__file__))  # "dir/"
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        level, frame = level + 1, frame.f_back
    return level


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")


def _step_needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the step Backforward will call takes a required argument (an LR scheduler's wrapper on the
    instance takes anything: the class's step it wraps says)."""
    step = optimizer.step
    if hasattr(step, "_wrapped_by_lr_sched"):
        step = type(optimizer).step.__get__(optimizer)
    return any(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in inspect.signature(step).parameters.values())
