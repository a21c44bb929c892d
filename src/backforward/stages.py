"""Stages: which parameters Backforward updates together, and in what order.

A stage is the unit that moves in one pass of a Backforward step. Only parameters that
the optimizer holds and that require grad belong to stages; frozen ones never do.

- ``"module"`` (default): every module that directly owns such parameters (its own, not
  its children's) is one stage. A parameter owned by several modules (tied weights)
  belongs to the first of them in registration order.
- ``"child"``: one stage per top-level child of the model (the model's own parameters
  form a stage of their own); ``"depth:N"`` groups by the first N parts of the owning
  module's name (``"depth:1"`` is ``"child"``; ``"depth:3"`` on ``encoder.layers.2.linear1``
  makes one stage per encoder layer).
- a list of modules or of parameter lists, in forward order.

Named granularities are ordered by **data flow**: by where each stage's parameters first
enter the computation, read from the autograd graph of a step's first pass (every node
carries a sequence number in the order the forward pass created it). This differs from
registration order and from module-call order (an attention module uses its ``out_proj``
without calling it; a parent may use its own parameter after its children). Stages that
graph does not use keep registration order, after the others. A reentrant checkpoint
hides its parameters from the graph: a step then needs explicit stages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import BackwardCFunction
from torch.utils.checkpoint import CheckpointFunction

Granularity = str  # "module", "child" or "depth:N"
StageSpec = Granularity | Sequence[nn.Module | Iterable[nn.Parameter]] | None


@dataclass(frozen=True)
class Stage:
    """One stage: a name for reports and its parameters."""

    name: str
    params: tuple[nn.Parameter, ...]


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first dotted name, for error messages and reports."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def granularity_depth(spec: Granularity) -> int | None:
    """None for "module"; the name depth for "child" (1) and "depth:N"; ValueError otherwise."""
    if spec == "module":
        return None
    if spec == "child":
        return 1
    if spec.startswith("depth:") and spec[6:].isdigit() and int(spec[6:]) >= 1:
        return int(spec[6:])
    raise ValueError(f"stages must be 'module', 'child', 'depth:N' (N >= 1) or a list, not {spec!r}")


def find_stages(model: nn.Module, trainable: Sequence[nn.Parameter], spec: StageSpec) -> list[Stage]:
    """The stages of ``trainable`` (held by the optimizer, requiring grad), checked to cover each once."""
    names = parameter_names(model)
    if spec is None or isinstance(spec, str):
        stages = owned_stages(model, trainable, granularity_depth(spec or "module"))
    else:
        stages = explicit_stages(model, spec, names, trainable)
    check_stages(stages, trainable, names)
    return stages


def owned_stages(model: nn.Module, trainable: Sequence[nn.Parameter], depth: int | None) -> list[Stage]:
    """Group parameters by owning module (its full name, or its first ``depth`` parts), in registration order."""
    wanted = {id(p) for p in trainable}
    groups: dict[str, list[nn.Parameter]] = {}
    taken: set[int] = set()
    for name, module in model.named_modules():
        key = name if depth is None else ".".join(name.split(".")[:depth])
        for p in module.parameters(recurse=False):
            if id(p) in wanted and id(p) not in taken:  # a tied parameter goes to its first owner
                taken.add(id(p))
                groups.setdefault(key or "(root)", []).append(p)
    return [Stage(key, tuple(params)) for key, params in groups.items()]


def explicit_stages(model: nn.Module, spec: Sequence[nn.Module | Iterable[nn.Parameter]],
                    names: dict[int, str], trainable: Sequence[nn.Parameter]) -> list[Stage]:
    """Stages the user gave: modules or lists of parameters, in the order given.

    Frozen parameters are left out (a stage left with none is dropped); a trainable
    parameter that the optimizer does not hold, or that is not the model's, is an error.
    """
    wanted = {id(p) for p in trainable}
    module_names = {id(m): name for name, m in model.named_modules()}
    stages = []
    for i, item in enumerate(spec):
        if isinstance(item, torch.Tensor):
            raise TypeError(f"stage {i} is a single tensor; pass a list of parameters or a module")
        given = tuple(item.parameters()) if isinstance(item, nn.Module) else tuple(item)
        for p in given:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"stage {i} holds a {type(p).__name__}, not a parameter")
            if id(p) not in names:
                raise ValueError(f"stage {i} holds a parameter of shape {tuple(p.shape)} that is not the model's")
            if id(p) not in wanted and p.requires_grad:
                raise ValueError(f"stage {i} holds parameter {names[id(p)]} that the optimizer does not hold")
        params = tuple(p for p in given if id(p) in wanted)
        if not params:
            continue
        if isinstance(item, nn.Module):
            registered = module_names.get(id(item))  # "" is the model itself
            owners = list(dict.fromkeys(names[id(p)].rpartition(".")[0] or "(root)" for p in params))
            unregistered = _common_prefix([names[id(p)] for p in params]) or "+".join(owners)
            name = (registered or "(root)") if registered is not None else unregistered
        else:
            name = names[id(params[0])]
        stages.append(Stage(name or f"stage{i}", params))
    return stages


def check_stages(stages: Sequence[Stage], trainable: Sequence[nn.Parameter], names: dict[int, str]) -> None:
    """Every trainable parameter in exactly one stage, or an error that names the parameter."""
    owner: dict[int, tuple[int, str]] = {}
    for i, stage in enumerate(stages):
        for p in stage.params:
            if id(p) in owner:
                first, name = owner[id(p)]
                raise ValueError(f"parameter {names[id(p)]} is listed twice in stage {name!r}" if first == i else
                                 f"parameter {names[id(p)]} is claimed by two stages: {name!r} and {stage.name!r}")
            owner[id(p)] = (i, stage.name)
    for p in trainable:
        if id(p) not in owner:
            raise ValueError(f"parameter {names[id(p)]} is in no stage")


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    prefix = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


@dataclass(frozen=True)
class GraphScan:
    """What a pass's autograd graph tells before its backward runs."""

    first_use: dict[int, int]          # id(leaf) -> sequence number of the first node that consumes it
    leaves: dict[int, torch.Tensor]    # id(leaf) -> the leaf: every tensor this backward could accumulate into
    hides_parameters: bool             # a reentrant checkpoint: its parameters are not edges of the graph


def scan_graph(roots: Sequence[torch.Tensor], *, first_use: bool) -> GraphScan:
    """Walk the graph from ``roots`` once: its leaves, whether any node hides leaves, and (``first_use``, for
    the data-flow order; else left empty) where each leaf is first used."""
    first: dict[int, int] = {}
    leaves: dict[int, torch.Tensor] = {}
    hides = False
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set = set()  # the nodes themselves: holding them keeps their ids from being reused
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node, BackwardCFunction):  # a Python autograd.Function's node
            hides = hides or node._forward_cls is CheckpointFunction
        for child, _ in node.next_functions:
            if child is None:
                continue
            if type(child) is _AccumulateGrad:
                leaf = child.variable
                leaves[id(leaf)] = leaf
                if first_use:
                    order = node._sequence_nr()
                    first[id(leaf)] = min(first.get(id(leaf), order), order)
            else:
                stack.append(child)
    return GraphScan(first, leaves, hides)


_AccumulateGrad = torch._C._functions.AccumulateGrad  # the node that puts a gradient into a leaf


def data_flow_order(stages: Sequence[Stage], scan: GraphScan) -> list[int]:
    """Stage indices sorted by where their parameters first enter the computation; unused ones last."""
    def first(i: int) -> float:
        return min((scan.first_use.get(id(p), math.inf) for p in stages[i].params), default=math.inf)

    return sorted(range(len(stages)), key=lambda i: (first(i), i))

