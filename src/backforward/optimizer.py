"""``Backforward``: a torch optimizer that wraps any other and updates stages one after another."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from . import distributed
from .engines import ChainEngine, RunPass, StepResult, backforward_step, closure_pass
from .ics import ICSReport, shift_and_cosine
from .stages import (
    Stage,
    call_ranking,
    check_stages,
    default_stages,
    explicit_stages,
    optimizer_params,
    parameter_names,
    record_call_order,
)

ORDERS = ("forward", "reverse")


class Backforward(torch.optim.Optimizer):
    r"""Backforward Propagation (Stoica & Simionescu, AAAI 2023) over any base optimizer.

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
    removed. Every pass of a step sees the same random numbers (dropout masks), buffers
    such as BatchNorm running statistics advance once with the first pass, and after the
    step each parameter's ``.grad`` holds the gradient it was updated with.

    Args:
        model: the model whose parameters ``optimizer`` holds.
        optimizer: any ``torch.optim.Optimizer``; it keeps its per-parameter state as usual.
        stages: ``None`` (one stage per module that directly owns trainable parameters,
            ordered by first call in the forward pass), or a list of modules or of
            parameter lists, in forward order.
        order: ``"forward"`` (the paper) or ``"reverse"`` (last stage first: keeps the shift).
        track_ics: compute the plain gradients :math:`G_k` in the first pass and fill
            ``last_report`` with ‖G_k − G'_k‖ and cos∠(G_k, G'_k) per stage.
        process_group: average each stage's gradients over this ``torch.distributed``
            group after each pass (default: the world group when initialised).
        check_replicas: after each step, compare parameter checksums across processes and
            raise if they differ (default: on when ``TORCH_DISTRIBUTED_DEBUG`` is set).

    The wrapper shares the base optimizer's ``param_groups`` and ``state``, so LR
    schedulers, ``state_dict``, ``zero_grad`` and hooks work unchanged. ``step(closure)``
    calls the closure (compute the loss, call ``backward()``, return the loss) once per
    stage and returns the first pass's loss. ``step_batch(inputs, targets, loss_fn)``
    gives the same result and uses the fast engine when the model is an ``nn.Sequential``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 stages: Sequence[nn.Module | Iterable[nn.Parameter]] | None = None,
                 order: str = "forward", *, track_ics: bool = False,
                 process_group: Any = None, check_replicas: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, not {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
        if isinstance(optimizer, Backforward):
            raise TypeError("optimizer is already a Backforward; wrap the base optimizer once")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters")
        params = optimizer_params(optimizer)
        names = parameter_names(model)
        for i, p in enumerate(params):
            if id(p) not in names:
                raise ValueError(f"optimizer parameter #{i} (shape {tuple(p.shape)}) is not a parameter of the model")
        self.model = model
        self.base_optimizer = optimizer
        self.order = order
        self.track_ics = track_ics
        self.process_group = process_group
        self.check_replicas = check_replicas
        self.last_losses: list[float] = []
        self.last_report: ICSReport | None = None
        given = stages is not None
        found = explicit_stages(stages, names, params) if given else default_stages(model, params)
        check_stages(found, params, names)
        self._stages = found
        self._ordered = given  # default stages are ordered by first call, found in the first step
        self._chain: ChainEngine | bool | None = None  # None: not decided yet; False: not a chain
        held = {id(p) for p in params}
        self._others = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
        self._shared = False
        super().__init__(params, dict(optimizer.defaults))
        self._shared = True
        # Share, don't copy: schedulers and checkpoints then see one set of groups and state.
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

    @property
    def stages(self) -> list[Stage]:
        """The stages in forward order (for default stages: known after the first step)."""
        return list(self._stages)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self._stages]

    def _sequence(self, forward: Sequence[int] | None = None) -> list[int]:
        """Stage indices in update order, given their forward order (default: as stored)."""
        forward = list(range(len(self._stages)) if forward is None else forward)
        return forward if self.order == "forward" else forward[::-1]

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One Backforward step; ``closure`` computes the loss and calls ``backward()``."""
        if closure is None:
            raise TypeError("Backforward.step needs a closure that computes the loss and calls backward(), "
                            "as for torch.optim.LBFGS (or use step_batch)")
        return self._step(closure_pass(closure))

    def step_batch(self, inputs: torch.Tensor, targets: torch.Tensor,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One step on a batch, the same as ``step`` with the obvious closure; fast on ``nn.Sequential``."""
        if self._ordered and self._chain is None:  # decided once, when the stage order is known
            chain = ChainEngine.supports(self.model, self._stages)
            self._chain = ChainEngine(self.model, self._stages, self._sequence()) if chain else False  # type: ignore
        if self._chain:
            return self._step(self._chain.make_pass(inputs, targets, loss_fn))

        def closure() -> torch.Tensor:
            loss = loss_fn(self.model(inputs), targets)
            loss.backward()
            return loss

        return self._step(closure_pass(closure))

    def cached_activations(self) -> list[torch.Tensor]:
        """Activations the fast engine holds between passes of a step (for memory accounting)."""
        return self._chain.cached_activations() if self._chain else []

    def _step(self, run_pass: RunPass) -> torch.Tensor:
        stages = self._stages
        if self._ordered:
            result = self._run(run_pass, self._sequence(), full_first_pass=self.track_ics)
        else:  # default stages: the first pass computes every gradient and records the call order
            with record_call_order(self.model) as called:
                result = self._run(run_pass, lambda: self._sequence(call_ranking(stages, called)),
                                   full_first_pass=True)
            self._stages = [stages[i] for i in self._sequence(result.sequence)]  # reverse undoes reverse
            self._ordered = True
        self.last_losses = [float(v) for v in result.losses]
        self._check_replicas()
        if self.track_ics:
            self.last_report = self._report(stages, result)
        return result.losses[0]

    def _run(self, run_pass: RunPass, sequence, full_first_pass: bool) -> StepResult:
        return backforward_step(self.model, self._stages, run_pass, lambda _k: self.base_optimizer.step(),
                                sequence=sequence, full_first_pass=full_first_pass,
                                keep_start_grads=self.track_ics, others=self._others,
                                reduce_grads=self._reducer())

    def _reducer(self) -> Callable[[list[torch.Tensor]], None] | None:
        return distributed.grad_averager(self.process_group)

    def _check_replicas(self) -> None:
        check = self.check_replicas if self.check_replicas is not None else distributed.debug_mode()
        if check:
            distributed.check_replicas([p for s in self._stages for p in s.params], self.process_group)

    def _report(self, stages: list[Stage], result: StepResult) -> ICSReport:
        """Per stage in forward order; ``stages`` is the list the step's indices refer to."""
        assert result.start_grads is not None
        forward = self._sequence(result.sequence)
        measured = [shift_and_cosine(result.start_grads[i], result.used_grads[i]) for i in forward]
        return ICSReport([stages[i].name for i in forward], list(self.last_losses),
                         [m[0] for m in measured], [m[1] for m in measured], [m[2] for m in measured])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._shared:
            raise NotImplementedError("add parameter groups to the base optimizer before wrapping it")
        super().add_param_group(param_group)  # only during Optimizer.__init__

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The base class replaces param_groups and state; re-share the base optimizer's.
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
