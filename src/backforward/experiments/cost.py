"""Two cost models of a step, counted on the model's graph of calls (``backforward.graph``).

Both add up the same pieces. With n stages, F the forward of every op, F(R_k) the forward
of the ops pass k recomputes (the graph engine's plan), B the backward computing every
weight gradient, B_k the backward restricted to stage k, U and U_k the base optimizer's
update of every parameter and of stage k's:

- ``sgd``     F + B + U
- ``paper``   n (F + B) + Σ U_k       (``reference_step``: n full passes)
- ``generic`` Σ_k F + B_k + U_k       (every pass runs the whole forward)
- ``fast``    Σ_k F(R_k) + B_k + U_k  (the chain and graph engines)

**FLOP model** (DESIGN §2): an op's forward costs the multiply-adds of the modules it
runs (elementwise ones, such as normalisation, count their outputs; parameter-free ops
count nothing); an input gradient and a weight gradient cost as much as the forward;
updates cost nothing. On a chain of n equal stages: SGD 3n − 1, fast n² + 2n − 1.

**Measured-cost model**: each op's forward time, B, every B_k, U and every U_k timed on
the model (medians over rounds; the bench interleaves them with its own timings). It counts
what FLOPs leave out (pooling, normalisation, attention's softmax, the loss) and leaves out
only the engine's own bookkeeping, so a method's measured time over its prediction is that
bookkeeping.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..graph import ModelGraph, Refusal, dependencies, model_graph, recompute_sets, stage_uses
from ..replay import BufferValues, rng_restore, rng_snapshot
from ..stages import Stage


@dataclass
class Costs:
    """The pieces of a step (seconds, or multiply-adds), for one set of stages in forward order."""

    forward: list[float]          # per op of the model graph, plus the loss as the last entry
    backward: float               # every weight gradient
    stage_backward: list[float]   # restricted to stage k
    update: float
    stage_update: list[float]
    recomputed: list[frozenset[int]]  # per pass, the ops the fast engine runs (every op where it cannot)

    def predict(self) -> dict[str, float]:
        n = len(self.stage_backward)
        whole = sum(self.forward)
        loss = self.forward[-1]
        fast = sum(sum(self.forward[i] for i in ops) + loss for ops in self.recomputed)
        rest = sum(self.stage_backward) + sum(self.stage_update)
        return {"sgd": whole + self.backward + self.update,
                "paper": n * (whole + self.backward) + sum(self.stage_update),
                "generic": n * whole + rest,
                "fast": fast + rest}


def model_plan(model: nn.Module, x: torch.Tensor, stages: Sequence[Stage]) -> tuple[ModelGraph, list]:
    """The model's graph and, per pass in forward order, the ops the fast engine recomputes."""
    try:
        graph = model_graph(model, x)
    except Refusal as reason:
        raise ValueError(f"the cost models count a model's graph of calls; this one has none: {reason}") from None
    return graph, recompute_sets(graph, stages, list(range(len(stages))))


# ---- FLOPs ----

def module_flops(module: nn.Module, inputs: tuple, output: object) -> float:
    """Forward multiply-adds of one module that owns parameters (elementwise ones: their outputs)."""
    out = output[0] if isinstance(output, tuple) else output
    if isinstance(module, nn.Linear):
        return float(out.numel() * module.in_features)
    if isinstance(module, nn.modules.conv._ConvNd):
        per_output = module.in_channels // module.groups
        for k in module.kernel_size:
            per_output *= k
        return float(out.numel() * per_output)
    if isinstance(module, nn.MultiheadAttention):
        q = inputs[0]
        tokens = q.numel() // q.shape[-1]
        length = q.shape[1] if module.batch_first else q.shape[0]
        d = module.embed_dim
        return float(4 * d * d * tokens + 2 * tokens * length * d)  # projections, then QK^T and AV
    if isinstance(module, nn.RNNBase):
        tokens = out.numel() // out.shape[-1]
        matrices = sum(p.numel() for name, p in module.named_parameters() if name.startswith("weight"))
        return float(matrices * tokens)  # each weight element: one multiply-add per token
    return float(out.numel())


def flop_costs(model: nn.Module, x: torch.Tensor, stages: Sequence[Stage]) -> Costs:
    """The FLOP model's pieces for ``stages`` (in forward order)."""
    graph, recomputed = model_plan(model, x, stages)
    n = len(stages)
    forward = _op_flops(model, graph, x)
    uses, depends = stage_uses(graph, stages), dependencies(graph, stages)
    owned = [{id(p) for p in s.params} for s in stages]

    def share(i: int, k: int) -> float:  # stage k's part of op i's weight gradient, by parameter count
        op_params = _params(graph, i)
        total = sum(p.numel() for p in op_params if any(id(p) in o for o in owned))
        return sum(p.numel() for p in op_params if id(p) in owned[k]) / total if total else 0.0

    def backward(ks: set[int]) -> float:
        cost = 0.0
        for i, op in enumerate(graph.ops):
            cost += forward[i] * sum(share(i, k) for k in uses[i] & ks)  # weight gradients
            if any(depends[r] & ks for r in op.reads):
                cost += forward[i]  # input gradient
        return cost

    return Costs(forward + [0.0], backward(set(range(n))), [backward({k}) for k in range(n)], 0.0, [0.0] * n,
                 recomputed)


def _op_flops(model: nn.Module, graph: ModelGraph, x: torch.Tensor) -> list[float]:
    """Per op, the multiply-adds of the parameter-owning modules it runs."""
    total = [0.0]

    def count(module: nn.Module, inputs: tuple, output: object) -> None:
        if any(p is not None for p in module._parameters.values()):
            total[0] += module_flops(module, inputs, output)

    modules = {id(op.module): op.module for op in graph.ops if op.module is not None}
    everything = {id(m): m for top in modules.values() for m in top.modules()}
    handles = [m.register_forward_hook(count) for m in everything.values()]
    flops = []
    rng, buffers = rng_snapshot(), BufferValues(list(model.modules()))
    try:
        with torch.no_grad():
            env: list = [None] * len(graph.ops)
            env[0] = x
            flops.append(0.0)
            for i, op in enumerate(graph.ops[1:], start=1):
                total[0] = 0.0
                env[i] = op.evaluate(env)
                flops.append(total[0])
    finally:
        for h in handles:
            h.remove()
        rng_restore(rng)  # counting runs the model: it leaves no trace
        buffers.put_back()
    return flops


def _params(graph: ModelGraph, i: int) -> list[nn.Parameter]:
    op = graph.ops[i]
    if op.module is not None:
        return list(op.module.parameters())
    value = op.evaluate([]) if op.free and op.params else None
    return [value] if isinstance(value, nn.Parameter) else []


# ---- measured times ----

def work_clock() -> Callable[[], float]:
    """The clock for timing steps: with one torch thread, this process's CPU time (so other processes on a
    shared machine do not count); with more, wall time."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


class CostMeter:
    """Times the pieces of a step on ``model`` (which it trains: give it a copy), a round at a time, so that
    its rounds can be interleaved with other timings; ``costs()`` gives the medians, for each set of stages."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable,
                 stage_sets: Sequence[Sequence[Stage]], make_optimizer: Callable,
                 clock: Callable[[], float] | None = None):
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn
        self.clock = clock or work_clock()
        self.stage_sets = [list(stages) for stages in stage_sets]
        self.graph, _ = model_plan(model, x, self.stage_sets[0])
        self.plans = [recompute_sets(self.graph, stages, list(range(len(stages)))) for stages in self.stage_sets]
        self.params = list(model.parameters())
        self.optimizer = make_optimizer(self.params)
        self.stage_optimizers = [[make_optimizer(list(stage.params)) for stage in stages] for stages in stage_sets]
        self.forward: list[list[float]] = [[] for _ in range(len(self.graph.ops) + 1)]  # ops, then the loss
        self.backward: list[float] = []
        self.update: list[float] = []
        self.stage_backward = [[[] for _ in stages] for stages in self.stage_sets]
        self.stage_update = [[[] for _ in stages] for stages in self.stage_sets]

    def round(self) -> None:
        """One measurement of every piece."""
        self._zero()
        loss = self._forward(timed=True)
        self.backward.append(self._timed(loss.backward))
        self.update.append(self._timed(self.optimizer.step))
        for s, stages in enumerate(self.stage_sets):
            for k, stage in enumerate(stages):
                self._zero()
                loss = self._forward(timed=False)
                self.stage_backward[s][k].append(self._timed(
                    lambda loss=loss, stage=stage: torch.autograd.backward(loss, inputs=list(stage.params))))
                self.stage_update[s][k].append(self._timed(self.stage_optimizers[s][k].step))
        self._zero()

    def costs(self) -> list[Costs]:
        forward = [_median(v) for v in self.forward]
        forward[0] = 0.0  # the input
        return [Costs(forward, _median(self.backward), [_median(v) for v in self.stage_backward[s]],
                      _median(self.update), [_median(v) for v in self.stage_update[s]], self.plans[s])
                for s in range(len(self.stage_sets))]

    def _forward(self, timed: bool) -> torch.Tensor:
        ops = self.graph.ops
        env: list = [None] * len(ops)
        env[0] = self.x
        clock = self.clock
        for i, op in enumerate(ops[1:], start=1):
            start = clock()
            env[i] = op.evaluate(env)
            if timed:
                self.forward[i].append(clock() - start)
        start = clock()
        loss = self.loss_fn(env[-1], self.y)
        if timed:
            self.forward[-1].append(clock() - start)
        return loss

    def _timed(self, fn: Callable[[], object]) -> float:
        start = self.clock()
        fn()
        return self.clock() - start

    def _zero(self) -> None:
        for p in self.params:
            p.grad = None


def measured_costs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable,
                   stage_sets: Sequence[Sequence[Stage]], make_optimizer: Callable, repeats: int = 5,
                   clock: Callable[[], float] | None = None) -> list[Costs]:
    """The measured pieces for each set of stages of ``model`` (in forward order), timed on a copy of it."""
    m = copy.deepcopy(model)
    by_id = dict(zip((id(p) for p in model.parameters()), m.parameters(), strict=True))
    sets = [[Stage(s.name, tuple(by_id[id(p)] for p in s.params)) for s in stages] for stages in stage_sets]
    meter = CostMeter(m, x, y, loss_fn, sets, make_optimizer, clock)
    for _ in range(repeats + 1):
        meter.round()
    return meter.costs()


def _median(values: list[float]) -> float:
    """The median without the first value (a warm-up)."""
    return statistics.median(values[1:]) if len(values) > 1 else 0.0


# ---- the closed form on a chain (what training runs count) ----

def stage_flops(model: nn.Sequential, x: torch.Tensor) -> list[float]:
    """Forward multiply-adds of each parameterised child, in order (elementwise ones count their outputs)."""
    flops: list[float] = []

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        flops.append(module_flops(module, inputs, output))

    handles = [c.register_forward_hook(count) for c in model if any(True for _ in c.parameters())]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return flops


def predicted_units(flops: Sequence[float]) -> dict[str, float]:
    """The FLOP model on a chain of stages with forward costs f₁ … fₙ, in closed form."""
    n, total = len(flops), sum(flops)
    sgd = 3 * total - flops[0]
    generic = sum(total + flops[k] + sum(flops[k + 1:]) for k in range(n))
    fast = (total + flops[0] + sum(flops[1:])) + sum(
        sum(flops[k - 1:]) + flops[k] + sum(flops[k + 1:]) for k in range(1, n))
    return {"sgd": sgd, "paper": n * sgd, "generic": generic, "fast": fast}
