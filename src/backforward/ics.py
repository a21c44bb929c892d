"""The ICS meter: Santurkar et al.'s (NeurIPS 2018, Def. 2.1) internal covariate shift per stage.

ICS of stage k at step t is ‖G_k − G'_k‖₂, with G_k the plain gradient at θ_t and G'_k
the gradient after the stages before k were updated; they also report cos∠(G_k, G'_k).
A Backforward step computes G'_k anyway (``Backforward(track_ics=True)``);
``measure_ics`` measures it on a plain SGD trajectory instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .engines import backforward_step, closure_pass, restore_buffers, rng_restore, rng_snapshot
from .stages import (
    call_ranking,
    check_stages,
    default_stages,
    explicit_stages,
    parameter_names,
    record_call_order,
)


@dataclass
class ICSReport:
    """Per stage, in stage order: name, pass loss, ‖G − G'‖₂, cos∠(G, G') and ‖G‖₂ (to normalise the shift)."""

    stage_names: list[str]
    losses: list[float]
    grad_shift: list[float]
    grad_cosine: list[float]
    grad_norm: list[float]

    def as_dict(self) -> dict[str, list]:
        return asdict(self)


def shift_and_cosine(g: Sequence[torch.Tensor | None],
                     g_prime: Sequence[torch.Tensor | None]) -> tuple[float, float, float]:
    """‖G − G'‖₂, cos∠(G, G') and ‖G‖₂ over one stage's parameters (a missing gradient counts as zero).

    The cosine is NaN when either gradient is zero: the angle is undefined there.
    """
    a = _flat(g, g_prime)
    b = _flat(g_prime, g)
    shift = float(torch.linalg.vector_norm(a - b))
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    cosine = float(torch.dot(a, b)) / (na * nb) if na > 0 and nb > 0 else math.nan
    return shift, cosine, na


def _flat(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor | None]) -> torch.Tensor:
    parts = []
    for g, other in zip(grads, like, strict=True):
        if g is None:
            g = torch.zeros_like(other) if other is not None else None
        if g is not None:
            parts.append(g.detach().reshape(-1).double())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def measure_ics(model: nn.Module, closure: Callable[[], torch.Tensor], lr: float,
                stages: Sequence[nn.Module | Sequence[nn.Parameter]] | None = None) -> ICSReport:
    """ICS along a plain SGD trajectory: G'_k after stages 1..k-1 took their SGD step θ − lr·G.

    ``closure`` computes the loss and calls ``backward()``. The model's parameters,
    gradients, buffers and the random number generators are left as they were.
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    names = parameter_names(model)
    found = explicit_stages(stages, names, params) if stages is not None else default_stages(model, params)
    check_stages(found, params, names)
    saved_data = [p.detach().clone() for p in params]
    saved_grads = [p.grad for p in params]
    buffers = list(model.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    rng = rng_snapshot()
    try:
        # The plain gradient G at θ_t, every stage at once; it also reveals the call order.
        for p in params:
            p.grad = None
        with torch.enable_grad(), record_call_order(model) as called:
            closure()
        plain = {id(p): (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()) for p in params}
        if stages is None:
            found = [found[i] for i in call_ranking(found, called)]
        restore_buffers(buffers, saved_buffers)
        rng_restore(rng)

        def plain_sgd_update(k: int) -> None:
            with torch.no_grad():
                for p in found[k].params:
                    p.sub_(plain[id(p)], alpha=lr)

        result = backforward_step(model, found, closure_pass(closure), plain_sgd_update,
                                  sequence=range(len(found)), full_first_pass=False)
        shifts = [shift_and_cosine([plain[id(p)] for p in s.params], used)
                  for s, used in zip(found, result.used_grads, strict=True)]
        return ICSReport([s.name for s in found], [float(v) for v in result.losses],
                         [s[0] for s in shifts], [s[1] for s in shifts], [s[2] for s in shifts])
    finally:
        with torch.no_grad():
            for p, data, grad in zip(params, saved_data, saved_grads, strict=True):
                p.copy_(data)
                p.grad = grad
        restore_buffers(buffers, saved_buffers)
        rng_restore(rng)
