"""``backforward bench --device cuda``: the MLPs on a GPU, eager and as whole-step CUDA graphs, with syncs counted.

At the paper's sizes a GPU step is short and the host launches every kernel from Python,
so the device mostly waits: what counts is the host's work per step, and whether it ever
waits for the device (a host-device synchronisation). Per model this times, in interleaved
rounds of wall time between ``torch.cuda.synchronize()`` calls: SGD, the paper's loop, the
generic and fast engines, fast without its finiteness check (its one host read) and also
without its rollback copy, the algorithm written by hand, and the steps of SGD, fast
(``backforward.CapturedStep``) and the loop by hand captured as CUDA graphs, each graphed
step against SGD's graphed step. A graphed fast step runs without the rollback copy and the
finiteness check (both need the host). It counts the synchronisations of one step of each
(``torch.cuda.set_sync_debug_mode("warn")``). The only model here is the FLOP model: the
measured-cost model times its pieces in CPU time.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from ..cuda_graphs import CapturedStep
from .bench import (
    LOSS,
    BenchModel,
    Record,
    Stepper,
    Variant,
    _ratio,
    example_batch,
    make_stepper,
    on_model,
)
from .cost import Costs, flop_costs

FAMILIES = ("mlp", "small-mlp")
TARGETS = {"eager_fast_vs_sgd": 4.0, "eager_target_depth": 8, "eager_target_width": 512, "graphed_vs_flops": 1.2}


def variants() -> list[Variant]:
    return [Variant("sgd"), Variant("paper"), Variant("generic"), Variant("fast"), Variant("fast", check_finite=False),
            Variant("fast", rollback=False, check_finite=False), Variant("by hand"), Variant("sgd", graphed=True),
            Variant("fast", graphed=True), Variant("by hand", graphed=True)]


def cuda_graph(step: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``step`` captured as a CUDA graph, after ``warmup`` runs on a side stream (as torch's docs do it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def make_cuda_stepper(variant: Variant, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> Stepper:
    """``make_stepper``'s step, or, graphed, one that copies the batch into the captured inputs and replays."""
    if not variant.graphed:
        return make_stepper(variant, model, x, y, lr)
    static_x, static_y = x.clone(), y.clone()
    eager = make_stepper(replace(variant, graphed=False), model, static_x, static_y, lr)
    if eager.backforward is not None:
        captured = CapturedStep(eager.backforward, static_x, static_y, LOSS)
        return replace(eager, variant=variant, step=lambda: captured(x, y))
    graph = cuda_graph(eager.step)

    def replay() -> None:  # the same copies CapturedStep makes, so the two graphed steps compare fairly
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()

    return replace(eager, variant=variant, step=replay)


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's words in sync debug mode "warn"


def count_syncs(step: Callable[[], object]) -> int:
    """Host-device synchronisations of one call of ``step`` after another, as torch's sync debug mode reports
    them (a lower bound: it does not see every kind; the first call's, such as a lazy initialisation of torch's
    own, are not counted)."""
    torch.cuda.synchronize()
    mode = torch.cuda.get_sync_debug_mode()
    counts = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        counts.append(sum(SYNC_WARNING in str(w.message) for w in caught))
    return counts[-1]


def bench_cuda_model(entry: BenchModel, steps: int = 20, warmup: int = 3, repeats: int = 10, lr: float = 1e-3,
                     progress=None) -> list[Record]:
    """Every variant of ``entry`` on the current CUDA device; a timed sample is ``repeats`` steps."""
    torch.manual_seed(0)
    model = entry.build()
    x, y = example_batch(entry)
    gpu_model, gx, gy = model.cuda(), x.cuda(), y.cuda()
    steppers = [make_cuda_stepper(v, gpu_model, gx, gy, lr) for v in variants()]
    for _ in range(warmup):
        for s in steppers:
            s.step()
        if progress is not None:
            progress.update(1)
    syncs = {s.variant: count_syncs(s.step) for s in steppers}
    times: dict[Variant, list[float]] = {s.variant: [] for s in steppers}
    for _ in range(steps):
        for s in steppers:  # interleaved: drift hits every variant alike
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                s.step()
            torch.cuda.synchronize()
            times[s.variant].append((time.perf_counter() - start) / repeats)
        if progress is not None:
            progress.update(1)
    fast = next(s for s in steppers if s.variant == Variant("fast"))
    cpu_model = model.cpu()
    flops = flop_costs(cpu_model, x, on_model(cpu_model, fast))
    medians = {s.variant: statistics.median(times[s.variant]) * 1e3 for s in steppers}
    return cuda_records(entry, [(s.variant, s.engine, s.rollback_bytes()) for s in steppers], medians, syncs, flops,
                        len(fast.stages))


def cuda_records(entry: BenchModel, steppers: Sequence[tuple[Variant, str, int]], ms: dict[Variant, float],
                 syncs: dict[Variant, int], flops: Costs, stages: int) -> list[Record]:
    """The records of one model: ``steppers`` (variant, engine, rollback bytes), their median ms per step and
    syncs per step; a graphed step is compared with SGD's graphed step, the loop by hand with fast's model."""
    records = []
    for v, engine, rollback_bytes in steppers:
        sgd_ms = ms[Variant("sgd", graphed=v.graphed)]
        modelled = "fast" if v.method == "by hand" else v.method
        records.append(Record(entry.name, entry.depth, entry.batch, v.method, engine, stages, v.granularity,
                              v.rollback, ms[v], ms[v] / sgd_ms, float("nan"), _ratio(flops, modelled), None,
                              0 if v.graphed else rollback_bytes, float("nan"), device="cuda", graphed=v.graphed,
                              check_finite=v.check_finite, syncs_per_step=syncs[v]))
    return records


def label(r: Record) -> str:
    return (r.method + (" graphed" if r.graphed else "") + ("" if r.check_finite else " unchecked")
            + ("" if r.rollback else " no rollback"))


def check_targets(records: Sequence[Record]) -> list[tuple[bool, str]]:
    """The GPU targets: no sync in a step, eager fast against SGD at depth 8, graphed steps against the FLOP model."""
    out = []
    for model in dict.fromkeys(r.model for r in records):
        rows = {label(r): r for r in records if r.model == model}
        head = f"{model}, depth {rows['fast'].depth}, {rows['fast'].stages} stages"
        unchecked, checked = rows["fast unchecked"], rows["fast"]
        out.append((unchecked.syncs_per_step == 0, f"{head}: fast with check_finite=False makes no host-device sync "
                                                   f"in a step: {unchecked.syncs_per_step} per step"))
        out.append((checked.syncs_per_step is not None and checked.syncs_per_step <= 1,
                    f"{head}: fast makes at most one sync per step, the finiteness check's read at its end: "
                    f"{checked.syncs_per_step} per step"))
        if checked.depth == TARGETS["eager_target_depth"] and model.endswith(f"x{TARGETS['eager_target_width']}"):
            bound = TARGETS["eager_fast_vs_sgd"]
            out.append((checked.ratio_to_sgd <= bound, f"{head}: eager fast at most {bound}x SGD's step: "
                                                       f"{checked.ratio_to_sgd:.2f}x (the FLOP model: "
                                                       f"{checked.flop_ratio:.2f}x)"))
        graphed, by_hand = rows["fast graphed"], rows["by hand graphed"]
        bound = TARGETS["graphed_vs_flops"]
        over = graphed.ratio_to_sgd / graphed.flop_ratio
        out.append((over <= bound, f"{head}: graphed fast at most {bound}x the FLOP model against SGD's graphed step: "
                                   f"{graphed.ratio_to_sgd:.2f}x against {graphed.flop_ratio:.2f}x, "
                                   f"measured/FLOP model = {over:.2f} (written by hand, graphed: "
                                   f"{by_hand.ratio_to_sgd / by_hand.flop_ratio:.2f})"))
    return out


def format_table(records: Sequence[Record], device_name: str) -> str:
    lines = [f"backforward bench --device cuda: {device_name}, torch {torch.__version__}; median ms/step of wall time "
             "(samples of several steps between torch.cuda.synchronize() calls), interleaved; x sgd: against SGD's "
             "eager step, for graphed rows SGD's graphed step; flops: the FLOP model; syncs: host-device "
             "synchronisations in one step, as torch.cuda.set_sync_debug_mode sees them (a lower bound)",
             f"{'model':<12}{'depth':>5}{'batch':>6}{'n':>4}  {'method':<27}{'engine':<10}{'ms/step':>9}{'x sgd':>7}"
             f"{'flops':>7}{'meas/flops':>11}{'syncs':>6}"]
    for r in records:
        lines.append(f"{r.model:<12}{r.depth:>5}{r.batch:>6}{r.stages:>4}  {label(r):<27}{r.engine:<10}"
                     f"{r.ms_per_step:>9.3f}{r.ratio_to_sgd:>7.2f}{r.flop_ratio:>7.2f}"
                     f"{r.ratio_to_sgd / r.flop_ratio:>11.2f}{r.syncs_per_step:>6}")
    lines.append("")
    for model in dict.fromkeys(r.model for r in records):
        ms = {label(r): r.ms_per_step for r in records if r.model == model}
        lines.append(f"{model}: the graph replay makes fast {ms['fast'] / ms['fast graphed']:.2f}x faster (and "
                     f"drops its rollback copy and check), SGD {ms['sgd'] / ms['sgd graphed']:.2f}x; the finiteness "
                     f"check costs {ms['fast'] / ms['fast unchecked']:.2f}x, with the rollback copy "
                     f"{ms['fast'] / ms['fast unchecked no rollback']:.2f}x; fast takes "
                     f"{ms['fast'] / ms['by hand']:.2f}x the loop written by hand, graphed "
                     f"{ms['fast graphed'] / ms['by hand graphed']:.2f}x; the paper's loop takes "
                     f"{ms['paper'] / ms['fast']:.2f}x fast's time")
    lines.append("")
    for met, what in check_targets(records):
        lines.append(f"{'met ' if met else 'MISS'}  {what}")
    return "\n".join(lines)
