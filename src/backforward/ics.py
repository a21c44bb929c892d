"""The ICS meter: Santurkar et al.'s (NeurIPS 2018, Def. 2.1) internal covariate shift per stage.

ICS of stage k at step t is ‖G_k − G'_k‖₂, with G_k the plain gradient at θ_t and G'_k
the gradient after the stages before k were updated; they also report cos∠(G_k, G'_k).
A Backforward step computes G'_k anyway (``Backforward(track_ics=True)``);
``measure_ics`` measures it on a plain SGD trajectory instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .engines import StepSetup, backforward_step, closure_pass
from .stages import Stage, StageSpec, find_stages, parameter_names


@dataclass
class ICSReport:
    """Per stage, in forward order: name, its pass loss, ‖G − G'‖₂, cos∠(G, G') and ‖G‖₂ (to normalise the shift)."""

    stage_names: list[str]
    losses: list[float]
    grad_shift: list[float]
    grad_cosine: list[float]
    grad_norm: list[float]

    def as_dict(self) -> dict[str, list]:
        return asdict(self)


def gradient_shift(g: Sequence[torch.Tensor], g_prime: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """[‖G − G'‖₂, cos∠(G, G'), ‖G‖₂] over one stage's parameters, in float64 on their device.

    A missing G' (the pass did not use the parameter) counts as zero; the cosine is NaN when either
    gradient is zero (no angle).
    """
    a = torch.cat([t.detach().reshape(-1).double() for t in g])
    b = torch.cat([(torch.zeros_like(t) if u is None else u).detach().reshape(-1).double()
                   for t, u in zip(g, g_prime, strict=True)])
    # The angle from vectors scaled to a largest entry of 1: tiny gradients' norms would underflow to 0
    # (a zero vector scales to 0/0 = NaN, as its angle is).
    unit_a, unit_b = a / a.abs().max(), b / b.abs().max()
    cosine = torch.dot(unit_a, unit_b) / (torch.linalg.vector_norm(unit_a) * torch.linalg.vector_norm(unit_b))
    return torch.stack([torch.linalg.vector_norm(a - b), cosine, torch.linalg.vector_norm(a)])


def measure_ics(model: nn.Module, closure: Callable[[], torch.Tensor], lr: float,
                stages: StageSpec = None) -> ICSReport:
    """ICS along a plain SGD trajectory: G'_k after stages 1..k-1 took their SGD step θ − lr·G.

    ``closure`` computes the loss, calls ``backward()`` and returns the loss. Stages as for
    ``Backforward`` (default: one per module that owns trainable parameters, in data-flow
    order). The model's parameters, gradients, buffers and the random number generators
    are left as they were.
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    found = find_stages(model, params, stages)
    plain: dict[int, torch.Tensor] = {}  # G at θ_t, filled in the first pass

    def plain_sgd_step(stage: Stage) -> None:
        with torch.no_grad():
            for p in stage.params:
                p.sub_(plain[id(p)], alpha=lr)

    named = stages is None or isinstance(stages, str)
    setup = StepSetup(stages=found, order=None if named else list(range(len(found))),
                      parameters=frozenset(parameter_names(model)), update=plain_sgd_step,
                      modules=list(model.modules()), start_grads=plain, check_finite=False)
    result = backforward_step(setup, closure_pass(closure), keep=False)
    forward = result.order
    measured = torch.stack([gradient_shift([plain[id(p)] for p in found[k].params], result.measured_grads[k])
                            for k in forward]).tolist()
    losses = result.losses.tolist()
    return ICSReport([found[k].name for k in forward], losses,
                     [m[0] for m in measured], [m[1] for m in measured], [m[2] for m in measured])
