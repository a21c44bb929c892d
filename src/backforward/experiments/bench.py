"""``backforward bench``: step time and memory of SGD, the paper's loop, and the two engines.

Methods are timed interleaved in one process, so machine drift hits each alike, and
compared with the cost model (``cost.py``) computed from each stage's FLOPs.

Memory is counted, not timed: bytes autograd saves for backward (parameters excluded),
plus the activations the fast engine caches between passes, at the step's peak.
"""

from __future__ import annotations

import copy
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..optimizer import Backforward
from ..reference import reference_step
from .cost import predicted_units, stage_flops
from .models import mlp, small_cnn

METHODS = ("sgd", "paper", "generic", "fast")
TARGETS = {"fast_vs_predicted": 1.15, "generic_vs_predicted": 1.2, "fast_speedup_over_paper": 2.0}
UPPER = "one-sided: an upper bound, faster than predicted passes"


@dataclass
class Record:
    model: str
    depth: int
    method: str
    ms_per_step: float
    ratio_to_sgd: float
    predicted_ratio: float
    saved_bytes: int


class SavedBytes:
    """Peak bytes held for backward (parameters excluded) plus extra tensors, such as a prefix cache.

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
        holder = self._Holder(tensor)
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


def method_steppers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, tuple]:
    """For each method: (its own model copy, a function doing one step, extra tensors it holds)."""
    loss_fn = nn.functional.cross_entropy
    steppers = {}
    for method in METHODS:
        m = copy.deepcopy(model)
        base = torch.optim.SGD(m.parameters(), lr=lr)

        def closure(m=m) -> torch.Tensor:
            loss = loss_fn(m(x), y)
            loss.backward()
            return loss

        if method == "sgd":
            def step(m=m, base=base, closure=closure) -> None:
                base.zero_grad()
                closure()
                base.step()
            extra: Callable[[], list[torch.Tensor]] = list
        elif method == "paper":
            stages = [list(c.parameters()) for c in m if any(True for _ in c.parameters())]

            def step(m=m, base=base, stages=stages, closure=closure) -> None:
                reference_step(m, base, stages, closure)
            extra = list
        else:
            bf = Backforward(m, base)
            if method == "generic":
                def step(bf=bf, closure=closure) -> None:
                    bf.step(closure)
            else:
                def step(bf=bf) -> None:
                    bf.step_batch(x, y, loss_fn)
            extra = bf._held_between_passes
            step()  # the first step finds the stage order; leave it out of the measurement
        steppers[method] = (m, step, extra)
    return steppers


def bench_model(name: str, depth: int, model: nn.Sequential, x: torch.Tensor, y: torch.Tensor,
                steps: int = 20, warmup: int = 3, lr: float = 1e-3, progress=None) -> list[Record]:
    steppers = method_steppers(model, x, y, lr)
    saved = {}
    for method, (m, step, extra) in steppers.items():
        with SavedBytes(list(m.parameters()), extra) as counter:
            step()
        saved[method] = counter.peak
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(warmup + steps):
        for method, (_, step, _) in steppers.items():  # interleaved: drift hits every method alike
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[method].append(time.perf_counter() - start)
        if progress is not None:
            progress.update(1)
    units = predicted_units(stage_flops(model, x))
    sgd_ms = statistics.median(times["sgd"]) * 1e3
    records = []
    for method in METHODS:
        ms = statistics.median(times[method]) * 1e3
        records.append(Record(name, depth, method, ms, ms / sgd_ms, units[method] / units["sgd"], saved[method]))
    return records


def default_suite(depths: Sequence[int], width: int, batch: int, cnn: bool, seed: int = 0):
    """(name, depth, model, x, y) for the MLPs and the small CNN."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    for depth in depths:
        torch.manual_seed(seed)
        yield f"mlp{depth}x{width}", depth, mlp(depth, width), x, y
    if cnn:
        torch.manual_seed(seed)
        yield "cnn", 2, small_cnn(), x, y


def check_targets(records: Sequence[Record]) -> list[tuple[str, bool, str]]:
    """Each target of the fast-engine issue: (what, met, the measured numbers)."""
    by = {(r.model, r.method): r for r in records}
    models = sorted({r.model for r in records}, key=[r.model for r in records].index)
    results = []
    for model in models:
        fast, generic, sgd = by[(model, "fast")], by[(model, "generic")], by[(model, "sgd")]
        where = f"{model} (depth {fast.depth})"
        f_over = fast.ratio_to_sgd / fast.predicted_ratio
        g_over = generic.ratio_to_sgd / generic.predicted_ratio
        results.append((f"{where}: fast measured/predicted <= {TARGETS['fast_vs_predicted']} ({UPPER})",
                        f_over <= TARGETS["fast_vs_predicted"], f"{f_over:.2f}"))
        results.append((f"{where}: generic measured/predicted <= {TARGETS['generic_vs_predicted']} ({UPPER})",
                        g_over <= TARGETS["generic_vs_predicted"], f"{g_over:.2f}"))
        results.append((f"{where}: fast saved bytes <= sgd's (one-sided)", fast.saved_bytes <= sgd.saved_bytes,
                        f"{fast.saved_bytes:,} vs {sgd.saved_bytes:,}"))
    deepest = max((r for r in records if r.model.startswith("mlp")), key=lambda r: r.depth, default=None)
    if deepest is not None:
        paper, fast = by[(deepest.model, "paper")], by[(deepest.model, "fast")]
        speedup = paper.ms_per_step / fast.ms_per_step
        results.append((f"{deepest.model} (depth {deepest.depth}): fast >= {TARGETS['fast_speedup_over_paper']}x "
                        "faster than paper (one-sided: a lower bound)",
                        speedup >= TARGETS["fast_speedup_over_paper"], f"{speedup:.2f}x"))
    return results


def format_table(records: Sequence[Record], threads: int) -> str:
    lines = [f"backforward bench: {threads} thread(s), median ms/step, interleaved",
             f"{'model':<12}{'depth':>6} {'method':<8}{'ms/step':>10}{'x sgd':>8}{'predicted':>10}"
             f"{'meas/pred':>10}{'saved bytes':>14}"]
    for r in records:
        lines.append(f"{r.model:<12}{r.depth:>6} {r.method:<8}{r.ms_per_step:>10.2f}{r.ratio_to_sgd:>8.2f}"
                     f"{r.predicted_ratio:>10.2f}{r.ratio_to_sgd / r.predicted_ratio:>10.2f}{r.saved_bytes:>14,}")
    lines.append("")
    for what, met, detail in check_targets(records):
        lines.append(f"{'met ' if met else 'MISS'}  {what}: {detail}")
    return "\n".join(lines)


def records_as_dicts(records: Sequence[Record]) -> list[dict]:
    return [asdict(r) for r in records]


def plot(records: Sequence[Record], path: str) -> None:
    """Step time against depth for the MLPs, each method with its cost-model curve (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_write_bytes

    mlps = [r for r in records if r.model.startswith("mlp")]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sgd_ms = {r.depth: r.ms_per_step for r in mlps if r.method == "sgd"}
    for i, method in enumerate(METHODS):
        rows = sorted((r for r in mlps if r.method == method), key=lambda r: r.depth)
        depths = [r.depth for r in rows]
        color = f"C{i}"
        ax.plot(depths, [r.ms_per_step for r in rows], "o-", color=color, label=f"{method} (measured)")
        ax.plot(depths, [r.predicted_ratio * sgd_ms[r.depth] for r in rows], "--", color=color, alpha=0.6)
    ax.set_xlabel("hidden layers (stages n = depth + 1)")
    ax.set_ylabel("ms per step")
    ax.set_yscale("log")
    ax.set_title("Step time vs depth (dashed: cost model x measured sgd)")
    ax.legend()
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# ---- communication: Backforward's per-pass all-reduce against DDP's ----

@dataclass
class CommRecord:
    model: str
    method: str
    allreduce_calls_per_step: float
    allreduce_bytes_per_step: float
    parameter_bytes: int


def comm_worker(rank: int, world: int, store: str, depths: Sequence[int], width: int, batch: int,
                steps: int, queue) -> None:
    """In each of ``world`` gloo processes: count all-reduce calls and bytes per step of both methods."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    counts = {"calls": 0, "bytes": 0}
    plain_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        counts["calls"] += 1
        counts["bytes"] += tensor.numel() * tensor.element_size()
        return plain_all_reduce(tensor, *args, **kwargs)

    loss_fn = nn.functional.cross_entropy
    records = []
    for name, _, model, x, y in default_suite(depths, width, batch, cnn=False):
        xs, ys = x[rank::world], y[rank::world]
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        bf_model = copy.deepcopy(model)
        bf = Backforward(bf_model, torch.optim.SGD(bf_model.parameters(), lr=1e-3))
        ddp = DistributedDataParallel(copy.deepcopy(model))
        ddp.register_comm_hook(None, allreduce_hook)  # DDP's own reduction, through dist.all_reduce: counted
        ddp_opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)

        def ddp_step(ddp=ddp, ddp_opt=ddp_opt, xs=xs, ys=ys) -> None:
            ddp_opt.zero_grad()
            loss_fn(ddp(xs), ys).backward()
            ddp_opt.step()

        def bf_step(bf=bf, xs=xs, ys=ys) -> None:
            bf.step_batch(xs, ys, loss_fn)

        dist.all_reduce = counting_all_reduce
        try:
            for method, step in (("backforward", bf_step), ("ddp", ddp_step)):
                step()  # warm-up: Backforward finds its stage order, DDP builds its buckets
                counts.update(calls=0, bytes=0)
                for _ in range(steps):
                    step()
                records.append(CommRecord(name, method, counts["calls"] / steps, counts["bytes"] / steps,
                                          param_bytes))
        finally:
            dist.all_reduce = plain_all_reduce
    if rank == 0:
        queue.put([asdict(r) for r in records])
        queue.close()
        queue.join_thread()  # the records must reach the parent before the process leaves
    dist.destroy_process_group()
    from .launch import exit_without_shutdown

    exit_without_shutdown(0)


def comm_records(depths: Sequence[int], width: int, batch: int, steps: int = 3, world: int = 2) -> list[CommRecord]:
    import multiprocessing
    import tempfile

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        procs = [context.Process(target=comm_worker, args=(r, world, f"{folder}/store", list(depths), width, batch,
                                                           steps, queue)) for r in range(world)]
        for p in procs:
            p.start()
        rows = queue.get(timeout=600)
        for p in procs:
            p.join(timeout=60)
    return [CommRecord(**r) for r in rows]


def format_comm(records: Sequence[CommRecord]) -> str:
    lines = ["backforward bench --distributed: 2 gloo processes on CPU, per step",
             f"{'model':<12} {'method':<12}{'all-reduce calls':>18}{'bytes':>14}{'parameter bytes':>17}"]
    for r in records:
        lines.append(f"{r.model:<12} {r.method:<12}{r.allreduce_calls_per_step:>18.1f}"
                     f"{r.allreduce_bytes_per_step:>14,.0f}{r.parameter_bytes:>17,}")
    lines.append("Backforward: one all-reduce per pass (n per step) of that stage's gradients, its 4-byte loss and a "
                 "4-byte used flag per parameter tensor;"
                 " DDP: one per gradient bucket.")
    return "\n".join(lines)


def profile_sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 10, rows: int = 8) -> str:
    """torch.profiler's table of where a plain SGD step spends CPU time: what the cost model leaves out."""
    from torch.profiler import ProfilerActivity, profile

    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
