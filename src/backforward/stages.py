"""The stage finder: which parameters Backforward updates together, and in what order.

A stage is the unit that moves in one pass of a Backforward step. By default every
module that directly owns parameters of the optimizer (its own, not its children's)
is one stage, and stages are ordered by the first call of their module in the
forward pass, which can differ from registration order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    """One stage: a name for reports, its parameters, and the module that owns them (if any)."""

    name: str
    params: tuple[nn.Parameter, ...]
    module: nn.Module | None = None


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters an optimizer holds, in group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> dotted name, for error messages and reports."""
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}


def default_stages(model: nn.Module, trainable: Iterable[nn.Parameter]) -> list[Stage]:
    """One stage per module that directly owns a trainable parameter, in registration order."""
    wanted = {id(p) for p in trainable}
    stages = []
    for name, module in model.named_modules():
        own = tuple(p for p in module.parameters(recurse=False) if id(p) in wanted)
        if own:
            stages.append(Stage(name or "(root)", own, module))
    return stages


def explicit_stages(spec: Sequence[nn.Module | Iterable[nn.Parameter]], names: dict[int, str],
                    trainable: Iterable[nn.Parameter]) -> list[Stage]:
    """Stages the user gave: modules (all their parameters) or lists of parameters, in the order given."""
    wanted = {id(p) for p in trainable}
    stages = []
    for i, item in enumerate(spec):
        if isinstance(item, nn.Module):
            params = tuple(p for p in item.parameters() if id(p) in wanted)
            module = item
        elif isinstance(item, torch.Tensor):
            raise TypeError(f"stage {i} is a single tensor; pass a list of parameters or a module")
        else:
            params = tuple(item)
            module = None
            for p in params:
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"stage {i} holds a {type(p).__name__}, not a parameter")
                if id(p) not in wanted:
                    raise ValueError(f"stage {i} holds parameter {names.get(id(p), tuple(p.shape))!s} "
                                     "that the optimizer does not hold")
        if not params:
            raise ValueError(f"stage {i} holds no parameter of the optimizer")
        first = names.get(id(params[0]), f"stage{i}")
        stages.append(Stage(first.rsplit(".", 1)[0] if module is not None else first, params, module))
    return stages


def check_stages(stages: Sequence[Stage], trainable: Sequence[nn.Parameter], names: dict[int, str]) -> None:
    """Every trainable parameter in exactly one stage, or an error that names the parameter."""
    owner: dict[int, str] = {}
    for stage in stages:
        for p in stage.params:
            if id(p) in owner:
                raise ValueError(f"parameter {names.get(id(p), tuple(p.shape))} is claimed by two stages: "
                                 f"{owner[id(p)]!r} and {stage.name!r} (tied weights need explicit stages)")
            owner[id(p)] = stage.name
    for p in trainable:
        if id(p) not in owner:
            raise ValueError(f"parameter {names.get(id(p), tuple(p.shape))} is in no stage")


@contextmanager
def record_call_order(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Yield a list that fills with the model's modules in order of their first call."""
    called: list[nn.Module] = []
    seen: set[int] = set()

    def note(module: nn.Module, _inputs: object) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            called.append(module)

    handles = [m.register_forward_pre_hook(note) for m in model.modules()]
    try:
        yield called
    finally:
        for h in handles:
            h.remove()


def call_ranking(stages: Sequence[Stage], called: Sequence[nn.Module]) -> list[int]:
    """Indices of ``stages`` sorted by their module's first call; stages never called keep
    registration order, after the others."""
    rank = {id(m): i for i, m in enumerate(called)}
    never = len(called)
    return sorted(range(len(stages)), key=lambda i: (rank.get(id(stages[i].module), never), i))
