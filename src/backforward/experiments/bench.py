"""``backforward bench``: step time and memory of SGD, the paper's loop and Backforward's engines, against cost models.

Models: the paper's MLP at several depths (width 512, batch 128); the same at width 64,
batch 16, where the engine's own per-pass work shows; the small CNN; and three models with
their own forward (``bench_models``): a ResNet, a Transformer encoder classifier, an LSTM
classifier. Methods: ``sgd`` (a plain step), ``paper`` (``reference_step``: n full passes),
``generic`` (``Backforward.step``: the closure whole in every pass) and ``fast``
(``step_batch``: the chain or graph engine; the engine column says which ran). ``fast``
also runs without rollback (what the failed-step guarantee costs) and, where a model has
blocks, at coarser stage granularities. On the MLPs, ``by hand`` is the same algorithm written
out in a few lines with no bookkeeping at all (``hand_written_step``): what any implementation
of Backforward costs on this machine, the floor under the engines' own overhead.

Every variant of one model is timed interleaved in one process, so drift hits each alike;
medians of the process's CPU time with one torch thread (other processes on a shared machine
then do not count), of wall time with more. Each method's time relative to SGD's is compared
with the measured-cost model (its pieces timed in the same rounds) and the FLOP model
(``cost.py``). Memory is counted, not timed: the bytes autograd saves for backward
(parameters excluded) plus the values the fast engine keeps between passes, at the step's
peak; and the copy of parameters and optimizer state the rollback holds.
"""

from __future__ import annotations

import copy
import io
import math
import signal
import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..optimizer import Backforward
from ..reference import reference_step
from ..stages import Stage
from .bench_models import DigitTransformer, LSTMClassifier, ResNet
from .cost import CostMeter, Costs, flop_costs, measured_costs, work_clock
from .models import mlp, small_cnn

LOSS = nn.functional.cross_entropy
MODELS = ("mlp", "small-mlp", "cnn", "resnet", "transformer", "lstm")
SMALL = {"width": 64, "batch": 16, "depths": (2, 4, 8)}  # the paper's own size, where overhead shows
BLOCK_BATCH = 32  # the ResNet, Transformer and LSTM
TARGETS = {"fast_vs_predicted": 1.15, "small_fast_vs_predicted": 1.25, "generic_vs_predicted": 1.2,
           "graph_speedup_over_generic": 1.3, "graph_target_min_stages": 8, "fast_speedup_over_paper": 2.0,
           "distributed_time_factor": 1.5}


@dataclass(frozen=True)
class BenchModel:
    name: str
    family: str                     # one of MODELS
    depth: int                      # hidden layers (MLP), blocks or layers
    batch: int
    build: Callable[[], nn.Module]
    granularities: tuple[str, ...] = ("module",)


def default_suite(models: Iterable[str], depths: Sequence[int], width: int, batch: int) -> list[BenchModel]:
    chosen = set(models)
    suite = []
    if "mlp" in chosen:
        suite += [BenchModel(f"mlp{d}x{width}", "mlp", d, batch, lambda d=d: mlp(d, width)) for d in depths]
    if "small-mlp" in chosen:
        w = SMALL["width"]
        suite += [BenchModel(f"mlp{d}x{w}", "small-mlp", d, SMALL["batch"], lambda d=d: mlp(d, w))
                  for d in SMALL["depths"]]
    if "cnn" in chosen:
        suite.append(BenchModel("cnn", "cnn", 2, batch, small_cnn))
    if "resnet" in chosen:
        suite.append(BenchModel("resnet", "resnet", 3, BLOCK_BATCH, ResNet, ("module", "depth:2", "child")))
    if "transformer" in chosen:
        suite.append(BenchModel("transformer", "transformer", 2, BLOCK_BATCH, DigitTransformer,
                                ("module", "depth:2", "child")))
    if "lstm" in chosen:
        suite.append(BenchModel("lstm", "lstm", 1, BLOCK_BATCH, LSTMClassifier))
    return suite


def example_batch(entry: BenchModel, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(entry.batch, 784, generator=g), torch.randint(0, 10, (entry.batch,), generator=g)


@dataclass(frozen=True)
class Variant:
    method: str                     # sgd, paper, generic, fast, by hand
    granularity: str = "module"
    rollback: bool = True
    check_finite: bool = True       # Backforward's one host read per step (bench_cuda counts it)
    graphed: bool = False           # replayed as a whole-step CUDA graph (bench_cuda)


def variants(entry: BenchModel) -> list[Variant]:
    out = [Variant("sgd"), Variant("paper"), Variant("generic"), Variant("fast"), Variant("fast", rollback=False)]
    if entry.family in ("mlp", "small-mlp"):
        out.append(Variant("by hand"))
    for granularity in entry.granularities[1:]:
        out += [Variant("generic", granularity), Variant("fast", granularity)]
    return out


@dataclass
class Record:
    model: str
    depth: int
    batch: int
    method: str
    engine: str                     # torch, reference, generic, chain or graph
    stages: int
    granularity: str
    rollback: bool
    ms_per_step: float
    ratio_to_sgd: float
    predicted_ratio: float          # the measured-cost model
    flop_ratio: float               # the FLOP model
    saved_bytes: int | None         # None: not counted (on CUDA)
    rollback_bytes: int             # parameters and optimizer state copied for a failed step (0: none)
    overhead_ms_per_pass: float     # measured beyond the measured-cost prediction, per pass
    device: str = "cpu"             # on "cuda" (bench_cuda): no measured-cost model, syncs counted
    graphed: bool = False           # a whole-step CUDA graph; ratio_to_sgd is then to SGD's graphed step
    check_finite: bool = True
    syncs_per_step: int | None = None


# ---- memory ----

class SavedBytes:
    """Peak bytes held for backward (parameters excluded) plus extra tensors, such as the values kept between passes.

    Inside the context, every tensor autograd saves is wrapped; the wrapper lives as long as
    the graph keeps it, so the live total falls when a graph is freed.
    """

    def __init__(self, exclude: Sequence[torch.Tensor], extra: Callable[[], list[torch.Tensor]] = list):
        self._excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self._extra = extra
        self._live: dict[int, list[int]] = {}  # storage pointer -> [holders, bytes]
        self.peak = 0

    class _Holder:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor: torch.Tensor):
            self.tensor = tensor

    def _pack(self, tensor: torch.Tensor) -> object:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        # A detached view: the tensor itself (a node's saved output) would hold its grad_fn, a cycle that outlives
        # a backward that does not run the node.
        holder = self._Holder(tensor.detach())
        if ptr not in self._excluded and ptr != 0:
            entry = self._live.setdefault(ptr, [0, storage.nbytes()])
            entry[0] += 1
            weakref.finalize(holder, self._release, ptr)
            self._observe()
        return holder

    def _release(self, ptr: int) -> None:
        entry = self._live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            del self._live[ptr]

    def _observe(self) -> None:
        held = {ptr: size for ptr, (_, size) in self._live.items()}
        for t in self._extra():
            held.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        self.peak = max(self.peak, sum(held.values()))

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda holder: holder.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def tensor_bytes(tensors: Iterable[object]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ---- one model ----

@dataclass
class Stepper:
    """One variant: its own model copy, a function doing one step, what it holds between passes."""

    variant: Variant
    model: nn.Module
    step: Callable[[], object]
    optimizer: torch.optim.Optimizer
    backforward: Backforward | None = None
    stages: list[list[nn.Parameter]] = field(default_factory=list)  # forward order

    @property
    def engine(self) -> str:
        method = self.variant.method
        if method in ("sgd", "paper", "by hand"):
            return {"sgd": "torch", "paper": "reference", "by hand": "chain"}[method]
        assert self.backforward is not None
        return self.backforward._engine

    def held(self) -> list[torch.Tensor]:
        return self.backforward._held_between_passes() if self.backforward is not None else []

    def rollback_bytes(self) -> int:
        if self.backforward is None or not self.variant.rollback or self.variant.method == "paper":
            return 0
        state = [v for s in self.optimizer.state.values() for v in s.values()]
        return tensor_bytes(self.model.parameters()) + tensor_bytes(state)


def make_stepper(variant: Variant, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> Stepper:
    m = copy.deepcopy(model)
    base = torch.optim.SGD(m.parameters(), lr=lr)

    def closure() -> torch.Tensor:
        loss = LOSS(m(x), y)
        loss.backward()
        return loss

    if variant.method == "sgd":
        def sgd_step() -> None:
            base.zero_grad()
            closure()
            base.step()
        return Stepper(variant, m, sgd_step, base)
    bf = Backforward(m, base, stages=variant.granularity, rollback=variant.rollback,
                     check_finite=variant.check_finite)
    bf.step(closure)  # the first step finds the stage order (data flow)
    stages = [list(s.params) for s in bf.stages]
    if variant.method == "by hand":
        assert isinstance(m, nn.Sequential)
        return Stepper(variant, m, hand_written_step(m, stages, x, y, lr), base, None, stages)
    runs = {"paper": lambda: reference_step(m, base, stages, closure), "generic": lambda: bf.step(closure),
            "fast": lambda: bf.step_batch(x, y, LOSS)}
    return Stepper(variant, m, runs[variant.method], base, None if variant.method == "paper" else bf, stages)


def hand_written_step(model: nn.Sequential, stages: Sequence[Sequence[nn.Parameter]], x: torch.Tensor,
                      y: torch.Tensor, lr: float) -> Callable[[], None]:
    """Backforward on a chain with no bookkeeping: no rollback, replay, checks, hooks or graph reading.

    Each child's input is kept from the pass that last computed it; pass k recomputes from
    the child of the stage that moved last, its backward is restricted to stage k, and stage
    k's own SGD steps (as the cost model times U_k). Stages in forward order, one child each.
    """
    children = list(model)
    child_of = {id(p): i for i, c in enumerate(children) for p in c.parameters()}
    moved = [child_of[id(stage[0])] for stage in stages]
    optimizers = [torch.optim.SGD(stage, lr=lr) for stage in stages]
    inputs: list[torch.Tensor] = [x] * len(children)

    def step() -> None:
        start = 0
        for k, stage in enumerate(stages):
            h = inputs[start]
            for i in range(start, len(children)):
                inputs[i] = h.detach()
                h = children[i](h)
            torch.autograd.backward(LOSS(h, y), inputs=list(stage))
            optimizers[k].step()
            for p in stage:
                p.grad = None
            start = moved[k]

    return step


def on_model(model: nn.Module, stepper: Stepper) -> list[Stage]:
    """The stepper's stages as stages of ``model`` (a copy of the same model), by parameter position."""
    position = {id(p): i for i, p in enumerate(stepper.model.parameters())}
    params = list(model.parameters())
    return [Stage(str(k), tuple(params[position[id(p)]] for p in stage)) for k, stage in enumerate(stepper.stages)]


def bench_model(entry: BenchModel, steps: int = 20, warmup: int = 3, lr: float = 1e-3,
                progress=None) -> list[Record]:
    torch.manual_seed(0)
    model = entry.build()
    x, y = example_batch(entry)
    steppers = [make_stepper(v, model, x, y, lr) for v in variants(entry)]
    for _ in range(warmup):  # also where the fast engine reads the model as a graph
        for s in steppers:
            s.step()
        if progress is not None:
            progress.update(1)
    saved = {}
    for s in steppers:
        with SavedBytes(list(s.model.parameters()), s.held) as counter:
            s.step()
        saved[s.variant] = counter.peak
    by_granularity = {s.variant.granularity: s for s in steppers if s.variant.method == "fast" and s.variant.rollback}
    measured_model = copy.deepcopy(model)
    meter = CostMeter(measured_model, x, y, LOSS, [on_model(measured_model, by_granularity[g])
                                                   for g in entry.granularities],
                      lambda ps: torch.optim.SGD(ps, lr=lr))
    meter.round()  # a warm-up round, dropped
    times: dict[Variant, list[float]] = {s.variant: [] for s in steppers}
    clock = work_clock()
    for _ in range(steps):
        for s in steppers:  # interleaved: drift hits every variant alike
            start = clock()
            s.step()
            times[s.variant].append(clock() - start)
        meter.round()  # the cost model's pieces, timed in the same rounds
        if progress is not None:
            progress.update(1)
    measured = dict(zip(entry.granularities, meter.costs(), strict=True))
    flops = {g: flop_costs(model, x, on_model(model, by_granularity[g])) for g in entry.granularities}
    sgd_ms = statistics.median(times[Variant("sgd")]) * 1e3
    records = []
    for s in steppers:
        v = s.variant
        ms = statistics.median(times[v]) * 1e3
        method = "generic" if v.method == "fast" and s.engine == "generic" else v.method
        modelled = "fast" if method == "by hand" else method  # the same algorithm: the same cost model
        predicted = _ratio(measured[v.granularity], modelled)
        n = len(s.stages) if s.stages else len(by_granularity["module"].stages)
        overhead = 0.0 if v.method == "sgd" else (ms - predicted * sgd_ms) / n
        records.append(Record(entry.name, entry.depth, entry.batch, v.method, s.engine, n, v.granularity, v.rollback,
                              ms, ms / sgd_ms, predicted, _ratio(flops[v.granularity], modelled), saved[v],
                              s.rollback_bytes(), overhead))
    return records


def _ratio(costs: Costs, method: str) -> float:
    predicted = costs.predict()
    return predicted[method] / predicted["sgd"]


# ---- targets ----

def check_targets(records: Sequence[Record]) -> list[tuple[bool, str]]:
    """Each target of the issues on these records: (met, one line naming the model, its depth and the bound)."""
    main = [r for r in records if r.granularity == "module" and r.rollback]
    by = {(r.model, r.method): r for r in main}
    models = list(dict.fromkeys(r.model for r in main))
    small = {f"mlp{d}x{SMALL['width']}" for d in SMALL["depths"]}
    out = []

    def line(met: bool, r: Record, what: str, value: str) -> None:
        out.append((met, f"{r.model}, depth {r.depth}, {r.stages} stages: {what}: {value}"))

    for model in models:
        fast, sgd = by[(model, "fast")], by[(model, "sgd")]
        bound = TARGETS["small_fast_vs_predicted" if model in small else "fast_vs_predicted"]
        over = fast.ratio_to_sgd / fast.predicted_ratio
        line(over <= bound, fast, f"{fast.engine} at most {bound}x its measured-cost prediction (upper bound only)",
             f"measured/predicted = {over:.2f}")
        if model.startswith("mlp") and model not in small:
            generic = by[(model, "generic")]
            over = generic.ratio_to_sgd / generic.predicted_ratio
            bound = TARGETS["generic_vs_predicted"]
            line(over <= bound, generic, f"generic at most {bound}x its measured-cost prediction (upper bound only)",
                 f"measured/predicted = {over:.2f}")
        line(fast.saved_bytes <= sgd.saved_bytes, fast, f"{fast.engine} saved bytes at most SGD's (upper bound only)",
             f"{fast.saved_bytes:,} vs {sgd.saved_bytes:,}")
        if fast.engine == "graph" and fast.model in ("resnet", "transformer") and \
                fast.stages >= TARGETS["graph_target_min_stages"]:
            generic = by[(model, "generic")]
            speedup = generic.ms_per_step / fast.ms_per_step
            bound = TARGETS["graph_speedup_over_generic"]
            line(speedup >= bound, fast, f"graph at least {bound}x faster than generic (lower bound only)",
                 f"{speedup:.2f}x")
    for family in (lambda m: m.startswith("mlp") and m not in small, lambda m: m in small):
        mlps = [by[(m, "fast")] for m in models if family(m)]
        if mlps:
            deepest = max(mlps, key=lambda r: r.depth)
            paper = by[(deepest.model, "paper")]
            speedup = paper.ms_per_step / deepest.ms_per_step
            bound = TARGETS["fast_speedup_over_paper"]
            # What the measured-cost model, and the algorithm written by hand, allow with no bookkeeping at all.
            by_hand = by.get((deepest.model, "by hand"))
            floor = "" if by_hand is None else \
                f"; written by hand with no bookkeeping: {paper.ms_per_step / by_hand.ms_per_step:.2f}x"
            line(speedup >= bound, deepest, f"fast at least {bound}x faster than the paper's loop (lower bound only)",
                 f"{speedup:.2f}x (the measured-cost model predicts "
                 f"{paper.predicted_ratio / deepest.predicted_ratio:.2f}x{floor})")
    return out


def notes(records: Sequence[Record]) -> list[str]:
    """What the failed-step guarantee and each granularity cost, per model."""
    lines = []
    for model in dict.fromkeys(r.model for r in records):
        rows = [r for r in records if r.model == model]
        on = next(r for r in rows if r.method == "fast" and r.granularity == "module" and r.rollback)
        off = next(r for r in rows if r.method == "fast" and not r.rollback)
        lines.append(f"{model}: rollback costs {on.ms_per_step / off.ms_per_step:.2f}x the step time of fast without "
                     f"it and keeps {on.rollback_bytes:,} bytes (a copy of the parameters and optimizer state)")
        by_hand = next((r for r in rows if r.method == "by hand"), None)
        if by_hand is not None:
            lines.append(f"{model}: fast takes {on.ms_per_step / by_hand.ms_per_step:.2f}x the step time of the same "
                         f"algorithm written by hand with no bookkeeping ({by_hand.ratio_to_sgd:.2f}x SGD; its "
                         f"measured/predicted {by_hand.ratio_to_sgd / by_hand.predicted_ratio:.2f})")
        coarse = [r for r in rows if r.method == "fast" and r.rollback]
        if len(coarse) > 1:
            costs = ", ".join(f"{r.granularity} ({r.stages} stages) {r.ratio_to_sgd:.2f}x" for r in coarse)
            lines.append(f"{model}: fast step time against SGD by granularity: {costs}")
    return lines


def format_table(records: Sequence[Record], threads: int) -> str:
    clock = "process CPU time" if threads == 1 else "wall time"
    lines = [f"backforward bench: {threads} thread(s), median ms/step of {clock}, interleaved; predicted: the "
             "measured-cost model, flops: the FLOP model (each relative to SGD); over/pass: ms per pass beyond the "
             "prediction",
             f"{'model':<12}{'depth':>5}{'batch':>6}{'n':>4} {'stages':<8}{'method':<8}{'engine':<10}{'ms/step':>9}"
             f"{'x sgd':>7}{'predicted':>10}{'meas/pred':>10}{'flops':>7}{'over/pass':>10}{'saved bytes':>13}"
             f"{'rollback bytes':>16}"]
    for r in records:
        rollback = f"{r.rollback_bytes:,}" if r.rollback else "off"
        lines.append(f"{r.model:<12}{r.depth:>5}{r.batch:>6}{r.stages:>4} {r.granularity:<8}{r.method:<8}{r.engine:<10}"
                     f"{r.ms_per_step:>9.2f}{r.ratio_to_sgd:>7.2f}{r.predicted_ratio:>10.2f}"
                     f"{r.ratio_to_sgd / r.predicted_ratio:>10.2f}{r.flop_ratio:>7.2f}{r.overhead_ms_per_pass:>10.3f}"
                     f"{r.saved_bytes:>13,}{rollback:>16}")
    lines.append("")
    lines += notes(records)
    lines.append("")
    for met, what in check_targets(records):
        lines.append(f"{'met ' if met else 'MISS'}  {what}")
    return "\n".join(lines)


def records_as_dicts(records: Sequence[Record]) -> list[dict]:
    """The records as JSON-ready dicts; a model that was not run (NaN) is null."""
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()}
            for r in records]


def plot(records: Sequence[Record], path: str) -> None:
    """Step time against the number of stages, one panel per model family; dashed: the cost model's prediction
    (measured-cost, or on CUDA the FLOP model) times SGD's measured step; dotted: whole-step CUDA graphs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_write_bytes

    families = list(dict.fromkeys(_family(r) for r in records))
    cols = min(3, len(families))
    rows = (len(families) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    for ax, family in zip(axes.flat, families, strict=False):
        mine = [r for r in records if _family(r) == family and r.rollback and r.check_finite]
        sgd_ms = {(r.model, r.granularity, r.graphed): r.ms_per_step for r in mine if r.method == "sgd"}
        for i, method in enumerate(("sgd", "paper", "generic", "fast")):
            for graphed in (False, True):
                rows_ = sorted((r for r in mine if r.method == method and r.graphed == graphed),
                               key=lambda r: r.stages)
                if not rows_:
                    continue
                color = f"C{i}"
                stages = [r.stages for r in rows_]
                ax.plot(stages, [r.ms_per_step for r in rows_], "s:" if graphed else "o-", color=color,
                        label=method + (" graphed" if graphed else ""))
                base = [sgd_ms.get((r.model, "module", graphed), r.ms_per_step / r.ratio_to_sgd) for r in rows_]
                ax.plot(stages, [_modelled_ratio(r) * b for r, b in zip(rows_, base, strict=True)], "--",
                        color=color, alpha=0.6)
        ax.set_title(family)
        ax.set_xlabel("stages n")
        ax.set_ylabel("ms per step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(families):]:
        ax.set_visible(False)
    on_cuda = any(r.device == "cuda" for r in records)
    fig.suptitle(f"Step time against stages (dashed: {'FLOP' if on_cuda else 'measured-cost'} model x measured SGD)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _modelled_ratio(r: Record) -> float:
    """The measured-cost model's ratio, or the FLOP model's where there is none (on CUDA)."""
    return r.flop_ratio if math.isnan(r.predicted_ratio) else r.predicted_ratio


def _family(r: Record) -> str:
    if r.model.startswith("mlp"):
        width = r.model.split("x")[-1]
        return f"MLP width {width} (stages: depth + 1)"
    return r.model


def profile_sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 10, rows: int = 8) -> str:
    """torch.profiler's table of where a plain SGD step spends CPU time."""
    from torch.profiler import ProfilerActivity, profile

    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        LOSS(m(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ---- past one machine: Backforward's per-pass all-reduce against DDP's, measured and modelled ----

@dataclass(frozen=True)
class Network:
    name: str
    alpha: float                    # seconds: latency of one message step
    beta: float                     # bytes per second per link


NETWORKS = (Network("one node, shared memory", 5e-6, 10e9),
            Network("100 Gb/s Ethernet", 25e-6, 12.5e9),
            Network("InfiniBand HDR 200 Gb/s", 2e-6, 25e9))
PROCESSES = (2, 4, 16, 64, 256, 1024)
DDP_FIRST_BUCKET, DDP_BUCKET = 1 << 20, 25 << 20  # torch's defaults (bucket_cap_mb=25)


def ring_allreduce(nbytes: float, processes: int, alpha: float, beta: float) -> float:
    """Seconds for a ring all-reduce: reduce-scatter then all-gather, 2(p-1) steps each of latency alpha that carry
    nbytes/p."""
    if processes < 2:
        return 0.0
    return 2 * (processes - 1) * (alpha + nbytes / processes / beta)


def backforward_messages(stages: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    """Bytes of each pass's one all-reduce (float32): stage k's gradients, the pass loss, a used-flag per tensor."""
    return [(sum(p.numel() for p in stage) + 1 + len(stage)) * 4 for stage in stages]


def ddp_buckets(params: Sequence[torch.Tensor]) -> list[int]:
    """Bytes of each gradient bucket DDP all-reduces: parameters in reverse order, a bucket closing once it holds
    1 MiB (the first) or 25 MiB (the others)."""
    buckets, current, limit = [], 0, DDP_FIRST_BUCKET
    for p in reversed(list(params)):
        current += p.numel() * p.element_size()
        if current >= limit:
            buckets.append(current)
            current, limit = 0, DDP_BUCKET
    return buckets + ([current] if current else [])


@dataclass
class CommRecord:
    model: str
    method: str                     # backforward or ddp
    stages: int
    batch_per_process: int
    calls_per_step: float           # counted
    bytes_per_step: float
    predicted_calls: int
    predicted_bytes: int
    ms_per_step: float              # measured, median
    predicted_ms: float             # the alpha-beta model with this run's fitted alpha and beta
    compute_ms: float               # the measured-cost model without communication
    backward_ms: float              # DDP overlaps its all-reduces with this
    messages: list[int]             # bytes of each all-reduce of a step
    alpha: float                    # fitted on this run
    beta: float


def step_time(record: CommRecord, processes: int, alpha: float, beta: float) -> float:
    """Seconds per step: Backforward's n all-reduces wait for each pass; DDP's overlap its backward."""
    comm = sum(ring_allreduce(m, processes, alpha, beta) for m in record.messages)
    if record.method == "backforward":
        return record.compute_ms / 1e3 + comm
    backward = record.backward_ms / 1e3
    return record.compute_ms / 1e3 - backward + max(backward, comm)


def fit_allreduce(processes: int, sizes: Sequence[int] = (4, 1 << 12, 1 << 16, 1 << 20, 1 << 22),
                  repeats: int = 15) -> tuple[float, float]:
    """Alpha and beta of this machine's all-reduce, by least squares over timed calls of several sizes."""
    import torch.distributed as dist

    points = []
    for size in sizes:
        t = torch.zeros(size // 4)
        samples = []
        for i in range(repeats + 3):
            start = time.perf_counter()
            dist.all_reduce(t)
            if i >= 3:
                samples.append(time.perf_counter() - start)
        points.append((float(size), statistics.median(samples)))
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    intercept = my - slope * mx
    steps = 2 * (processes - 1)  # T = steps * alpha + (steps / p) * m / beta
    return max(intercept, 0.0) / steps, steps / processes / slope


def comm_worker(rank: int, world: int, store: str, suite_args: tuple, steps: int, queue) -> None:
    """In each of ``world`` gloo processes: count and time the all-reduces of both methods on every model."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    alpha, beta = fit_allreduce(world)
    counts = {"calls": 0, "bytes": 0}
    plain_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        counts["calls"] += 1
        counts["bytes"] += tensor.numel() * tensor.element_size()
        return plain_all_reduce(tensor, *args, **kwargs)

    records = []
    for entry in default_suite(*suite_args):
        torch.manual_seed(0)
        model = entry.build()
        x, y = example_batch(entry)
        xs, ys = x[rank::world], y[rank::world]
        bf_model = copy.deepcopy(model)
        bf = Backforward(bf_model, torch.optim.SGD(bf_model.parameters(), lr=1e-3))
        ddp = DistributedDataParallel(copy.deepcopy(model))
        ddp.register_comm_hook(None, allreduce_hook)  # DDP's own reduction, through dist.all_reduce: counted
        ddp_opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)

        def ddp_step(ddp=ddp, ddp_opt=ddp_opt, xs=xs, ys=ys) -> None:
            ddp_opt.zero_grad()
            LOSS(ddp(xs), ys).backward()
            ddp_opt.step()

        def bf_step(bf=bf, xs=xs, ys=ys) -> None:
            bf.step_batch(xs, ys, LOSS)

        for step in (bf_step, ddp_step, bf_step, ddp_step):
            step()  # Backforward finds its stage order and graph, DDP builds its buckets
        stages = [list(s.params) for s in bf.stages]
        costs = measured_costs(bf_model, xs, ys, LOSS, [[Stage(str(k), tuple(s)) for k, s in enumerate(stages)]],
                               lambda ps: torch.optim.SGD(ps, lr=1e-3), clock=time.perf_counter)[0]  # waits count
        predicted = costs.predict()
        dist.all_reduce = counting_all_reduce
        times: dict[str, list[float]] = {"backforward": [], "ddp": []}
        seen = {"backforward": [0, 0], "ddp": [0, 0]}
        try:
            for _ in range(steps):
                for method, step in (("backforward", bf_step), ("ddp", ddp_step)):
                    counts.update(calls=0, bytes=0)
                    start = time.perf_counter()
                    step()
                    times[method].append(time.perf_counter() - start)
                    seen[method][0] += counts["calls"]
                    seen[method][1] += counts["bytes"]
        finally:
            dist.all_reduce = plain_all_reduce
        for method, messages, compute in (("backforward", backforward_messages(stages), predicted["fast"]),
                                          ("ddp", ddp_buckets(list(model.parameters())), predicted["sgd"])):
            record = CommRecord(entry.name, method, len(stages), len(xs), seen[method][0] / steps,
                                seen[method][1] / steps, len(messages), sum(messages),
                                statistics.median(times[method]) * 1e3, 0.0, compute * 1e3, costs.backward * 1e3,
                                messages, alpha, beta)
            record.predicted_ms = step_time(record, world, alpha, beta) * 1e3
            records.append(record)
    if rank == 0:
        queue.put([asdict(r) for r in records])
        queue.close()
        queue.join_thread()  # the records must reach the parent before the process leaves
    dist.destroy_process_group()
    from .launch import exit_without_shutdown

    exit_without_shutdown(0)


def comm_records(suite: Sequence[BenchModel], steps: int = 5, world: int = 2) -> list[CommRecord]:
    """Both methods on ``world`` gloo processes (the models rebuilt there from their names)."""
    import multiprocessing
    import tempfile

    families = list(dict.fromkeys(e.family for e in suite))
    mlps = [e for e in suite if e.family == "mlp"]
    suite_args = (families, sorted({e.depth for e in mlps}) or [1], int(mlps[0].name.split("x")[-1]) if mlps else 1,
                  mlps[0].batch if mlps else 1)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        procs = [context.Process(target=comm_worker, args=(r, world, f"{folder}/store", suite_args, steps, queue))
                 for r in range(world)]
        # Ctrl-C reaches every process of the terminal's group: the workers inherit an ignored SIGINT (exec keeps
        # it, and Python leaves it so), and this process stops them instead of each printing a traceback.
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for p in procs:
                p.start()
        finally:
            signal.signal(signal.SIGINT, handler)
        try:
            rows = queue.get(timeout=3600)
        except BaseException:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            raise
        finally:
            for p in procs:
                p.join(timeout=60)
    return [CommRecord(**r) for r in rows]


def scaling(records: Sequence[CommRecord]) -> list[tuple[Network, CommRecord, list[float]]]:
    """Weak scaling efficiency (per-process batch fixed) of each method on each network at PROCESSES."""
    out = []
    for network in NETWORKS:
        for r in records:
            alone = r.compute_ms / 1e3
            out.append((network, r, [alone / step_time(r, p, network.alpha, network.beta) for p in PROCESSES]))
    return out


def check_comm(records: Sequence[CommRecord]) -> list[tuple[bool, str]]:
    factor = TARGETS["distributed_time_factor"]
    out = []
    for r in records:
        exact = r.calls_per_step == r.predicted_calls and r.bytes_per_step == r.predicted_bytes
        out.append((exact, f"{r.model}, {r.method}: all-reduce calls and bytes per step as modelled (exactly): "
                           f"{r.calls_per_step:g} calls, {r.bytes_per_step:,.0f} bytes; model {r.predicted_calls} "
                           f"calls, {r.predicted_bytes:,} bytes"))
        ratio = r.ms_per_step / r.predicted_ms
        out.append((1 / factor <= ratio <= factor,
                    f"{r.model}, {r.method}: 2-process step time within {factor}x of the model (both ways): "
                    f"measured/predicted = {ratio:.2f}"))
    return out


def format_comm(records: Sequence[CommRecord], table: Sequence[tuple[Network, CommRecord, list[float]]]) -> str:
    first = records[0] if records else None
    lines = ["backforward bench --distributed: 2 gloo processes on CPU, 1 thread each; per step, median ms",
             f"all-reduce fitted on this run: alpha = {first.alpha * 1e6:.1f} us, beta = {first.beta / 1e9:.2f} GB/s"
             if first else "no records",
             f"{'model':<12}{'method':<13}{'n':>4}{'calls':>7}{'model':>7}{'bytes':>14}{'model':>14}{'ms/step':>10}"
             f"{'predicted':>11}{'compute':>9}"]
    for r in records:
        lines.append(f"{r.model:<12}{r.method:<13}{r.stages:>4}{r.calls_per_step:>7.1f}{r.predicted_calls:>7}"
                     f"{r.bytes_per_step:>14,.0f}{r.predicted_bytes:>14,}{r.ms_per_step:>10.2f}{r.predicted_ms:>11.2f}"
                     f"{r.compute_ms:>9.2f}")
    lines += ["", "Model: a ring all-reduce of m bytes on p processes takes 2(p-1)(alpha + m/(p beta)). Backforward "
              "makes one per pass, after that pass's backward (n per step, none overlapped); DDP's buckets overlap its "
              "backward: step = forward + update + max(backward, all-reduces). Compute from the measured-cost model. "
              "Weak scaling (the per-process batch above), efficiency = compute alone / step:", ""]
    header = f"{'network':<26}{'model':<12}{'method':<13}" + "".join(f"{f'p={p}':>8}" for p in PROCESSES)
    lines.append(header)
    for network, r, efficiencies in table:
        lines.append(f"{network.name:<26}{r.model:<12}{r.method:<13}" + "".join(f"{e:>8.2f}" for e in efficiencies))
    lines.append("")
    for network in NETWORKS:
        for r in records:
            if r.method != "backforward":
                continue
            effs = next(e for n, rec, e in table if n is network and rec is r)
            below = next((p for p, e in zip(PROCESSES, effs, strict=True) if e < 0.5), None)
            where = (f"falls below 50% efficiency at {below} processes" if below else
                     f"keeps 50% efficiency or more up to {PROCESSES[-1]} processes")
            lines.append(f"{network.name}: {r.model}, Backforward ({r.stages} all-reduces per step) {where}")
    lines.append("")
    for met, what in check_comm(records):
        lines.append(f"{'met ' if met else 'MISS'}  {what}")
    return "\n".join(lines)
