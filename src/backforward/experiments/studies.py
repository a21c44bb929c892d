"""``backforward study NAME``: the questions the paper left open, each a report section with verdicts.

- ``depth``      does Backforward's advantage grow with depth? (and ICS per layer against depth)
- ``batchnorm``  does BatchNorm reduce ICS as measured here? how does BatchNorm do without ICS?
- ``warmup``     Backforward for the first epochs, or for fine-tuning: a lasting benefit, at what cost?
- ``order``      forward vs reverse vs SGD: is a gain from removing ICS or from updating one stage at a time?
- ``cost``       per step, per FLOP, per second: does Backforward win per unit of compute?

A seed fixes initial weights and batch order for every arm, so arms are compared pair by pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .report import (
    HOLDS,
    area,
    claims_table,
    compare,
    curves_figure,
    final,
    fmt_ci,
    markdown_table,
    mean_ci,
    pyplot,
    save_figure,
    write_section,
)
from .sweep import Run, run_all
from .train import TrainConfig


@dataclass(frozen=True)
class StudyConfig:
    seeds: int = 5
    epochs: int = 40
    lrs: tuple[float, ...] = (0.1, 0.05, 0.01)
    depths: tuple[int, ...] = (1, 2, 4, 8)
    lr: float = 0.05              # the single learning rate of the studies that use one
    hidden: int = 256
    switch_epoch: int = 10        # warm-up: Backforward for this many epochs, then SGD
    finetune_epochs: int = 20


FULL = StudyConfig()
QUICK = StudyConfig(seeds=2, epochs=8, lrs=(0.1, 0.01), depths=(1, 4), switch_epoch=2, finetune_epochs=4)


@dataclass(frozen=True)
class Study:
    name: str
    plan: Callable[[StudyConfig, Path], list[Run]]
    analyse: Callable[[StudyConfig, dict[str, list[dict]], Path], str]


def _config(cfg: StudyConfig, **kwargs) -> TrainConfig:
    return TrainConfig(**{"epochs": cfg.epochs, "hidden": cfg.hidden, "lr": cfg.lr, **kwargs})


def _seeds(metrics: dict[str, list[dict]], prefix: str, cfg: StudyConfig) -> list[list[dict]]:
    return [metrics[f"{prefix}-s{s}"] for s in range(cfg.seeds)]


def _runs(prefix: str, cfg: StudyConfig, **kwargs) -> list[Run]:
    return [Run(f"{prefix}-s{s}", _config(cfg, seed=s, **kwargs)) for s in range(cfg.seeds)]


def _mean_ics(run: Sequence[dict], key: str = "grad_shift", skip_first: bool = True) -> float:
    """A run's ICS: mean over epochs and over stages (the first stage's is 0 by definition, left out)."""
    values = []
    for m in run:
        stages = list(m.get("ics", {}).values())[1 if skip_first else 0:]
        values += [s[key] for s in stages if math.isfinite(s[key])]
    return float(np.mean(values)) if values else math.nan


def _one_minus_cos(run: Sequence[dict]) -> float:
    return 1.0 - _mean_ics(run, "grad_cosine")


def _cost_table(arms: dict[str, list[list[dict]]]) -> str:
    rows = []
    for label, runs in arms.items():
        rows.append([label, fmt_ci(mean_ci(final(runs, "val_acc"))), fmt_ci(mean_ci(area(runs, "train_loss"))),
                     f"{np.mean(final(runs, 'flops')):.3g}", f"{np.mean(final(runs, 'train_seconds')):.1f}"])
    return markdown_table(["arm", "final val acc", "mean train loss", "FLOPs/run", "train seconds/run"], rows)


# ---- depth ----

def plan_depth(cfg: StudyConfig, out: Path) -> list[Run]:
    return [run for depth in cfg.depths for lr in cfg.lrs for method in ("sgd", "backforward")
            for run in _runs(f"depth{depth}-{method}-lr{lr:g}", cfg, method=method, lr=lr, depth=depth,
                             track_ics=True)]


def analyse_depth(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    claims, growth = [], []
    for lr in cfg.lrs:
        def advantage(depth: int, lr: float = lr) -> list[float]:
            sgd = area(_seeds(metrics, f"depth{depth}-sgd-lr{lr:g}", cfg), "train_loss")
            bf = area(_seeds(metrics, f"depth{depth}-backforward-lr{lr:g}", cfg), "train_loss")
            return [a - b for a, b in zip(sgd, bf, strict=True)]  # > 0: Backforward lower

        for depth in cfg.depths:
            claims.append(compare(f"lr {lr:g}, depth {depth}: Backforward converges faster",
                                  "mean training loss over epochs",
                                  area(_seeds(metrics, f"depth{depth}-sgd-lr{lr:g}", cfg), "train_loss"),
                                  area(_seeds(metrics, f"depth{depth}-backforward-lr{lr:g}", cfg), "train_loss"),
                                  higher_is_better=False))
        lo = min(cfg.depths)
        for depth in [d for d in cfg.depths if d != lo]:
            growth.append(compare(f"lr {lr:g}: the advantage grows from depth {lo} (A) to depth {depth} (B)",
                                  "SGD − Backforward mean training loss", advantage(lo), advantage(depth)))
    chance = math.log(10)  # the loss of a uniform guess over 10 classes
    untrained = [f"depth {d}, lr {lr:g}" for lr in cfg.lrs for d in cfg.depths
                 if all(np.mean(final(_seeds(metrics, f"depth{d}-{m}-lr{lr:g}", cfg), "train_loss")) > 0.99 * chance
                        for m in ("sgd", "backforward"))]
    stuck = (f"**Neither method trained** (final training loss above 99% of ln 10, a uniform guess) at: "
             f"{'; '.join(untrained)}. Comparisons there say nothing about ICS." if untrained
             else "Every depth trained with both methods.")
    panels = [(f"lr {lr:g}", {f"{m} d{d}": _seeds(metrics, f"depth{d}-{m}-lr{lr:g}", cfg)
                              for d in (min(cfg.depths), max(cfg.depths)) for m in ("sgd", "backforward")})
              for lr in cfg.lrs]
    curves_figure(out / "depth_curves.png", panels, [("train_loss", "training loss", True)])
    _ics_by_layer_figure(cfg, metrics, out / "depth_ics.png")
    return f"""## Study: depth

MLPs with {', '.join(map(str, cfg.depths))} hidden layers of width {cfg.hidden}, SGD vs Backforward at lr
{', '.join(f'{lr:g}' for lr in cfg.lrs)}, {cfg.epochs} epochs, {cfg.seeds} seeds. ICS is measured on every
step (Santurkar et al.'s ‖G − G'‖ on the SGD runs' own trajectory). The models use PyTorch's
default initialisation, as the paper's code does.

{claims_table(claims)}

Backforward's advantage (SGD's mean training loss minus Backforward's, seed by seed) at depth 1
against each deeper network:

{claims_table(growth, "A", "B")}

{stuck}

![depth curves](depth_curves.png)

Per-layer ICS (SGD runs, mean over steps of the last epoch) against layer index, one line per depth:

![ICS by layer](depth_ics.png)

What each arm costs:

{_cost_table({f"{m}, depth {d}, lr {lr:g}": _seeds(metrics, f"depth{d}-{m}-lr{lr:g}", cfg)
              for lr in cfg.lrs for d in cfg.depths for m in ("sgd", "backforward")})}
"""


def _ics_by_layer_figure(cfg: StudyConfig, metrics: dict[str, list[dict]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cfg.lrs), figsize=(4.2 * len(cfg.lrs), 3.4), squeeze=False)
    for ax, lr in zip(axes[0], cfg.lrs, strict=True):
        for i, depth in enumerate(cfg.depths):
            runs = [r for r in _seeds(metrics, f"depth{depth}-sgd-lr{lr:g}", cfg) if r and "ics" in r[-1]]
            if not runs:
                continue
            layers = list(runs[0][-1]["ics"])
            means = [np.mean([r[-1]["ics"][name]["grad_shift"] for r in runs]) for name in layers]
            ax.plot(range(1, len(layers) + 1), means, "o-", color=f"C{i}", label=f"depth {depth}")
        ax.set_xlabel("stage (layer) index")
        ax.set_ylabel("‖G − G'‖₂")
        ax.set_title(f"ICS per layer, lr {lr:g}")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


# ---- batchnorm ----

BN_ARMS = (("plain", False), ("bn", True))


def plan_batchnorm(cfg: StudyConfig, out: Path) -> list[Run]:
    return [run for name, bn in BN_ARMS for method in ("sgd", "backforward")
            for run in _runs(f"bn-{name}-{method}", cfg, method=method, depth=2, batchnorm=bn, track_ics=True)]


def analyse_batchnorm(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    arm = {f"{n}-{m}": _seeds(metrics, f"bn-{n}-{m}", cfg) for n, _ in BN_ARMS for m in ("sgd", "backforward")}
    claims = [
        compare("BatchNorm reduces ICS (A: plain, B: BatchNorm; SGD)", "mean ‖G − G'‖₂ of stages 2..n",
                [_mean_ics(r) for r in arm["plain-sgd"]], [_mean_ics(r) for r in arm["bn-sgd"]],
                higher_is_better=False),
        compare("BatchNorm reduces ICS, scale-free (A: plain, B: BatchNorm; SGD)", "mean 1 − cos∠(G, G')",
                [_one_minus_cos(r) for r in arm["plain-sgd"]], [_one_minus_cos(r) for r in arm["bn-sgd"]],
                higher_is_better=False),
        compare("With BatchNorm, Backforward converges faster than SGD", "mean training loss over epochs",
                area(arm["bn-sgd"], "train_loss"), area(arm["bn-backforward"], "train_loss"), higher_is_better=False),
        compare("With BatchNorm, Backforward performs better than SGD", "final validation accuracy",
                final(arm["bn-sgd"], "val_acc"), final(arm["bn-backforward"], "val_acc")),
        compare("Backforward's gain is larger with BatchNorm (A: plain, B: BatchNorm)",
                "SGD − Backforward mean training loss",
                _gain(arm["plain-sgd"], arm["plain-backforward"]), _gain(arm["bn-sgd"], arm["bn-backforward"])),
    ]
    labels = {"plain-sgd": "SGD", "plain-backforward": "Backforward", "bn-sgd": "SGD + BN",
              "bn-backforward": "Backforward + BN"}
    curves_figure(out / "batchnorm_curves.png",
                  [("without BatchNorm", {labels[k]: arm[k] for k in ("plain-sgd", "plain-backforward")}),
                   ("with BatchNorm", {labels[k]: arm[k] for k in ("bn-sgd", "bn-backforward")})],
                  [("train_loss", "training loss", True), ("val_acc", "validation accuracy", False)])
    return f"""## Study: BatchNorm

MLP with 2 hidden layers of width {cfg.hidden}, with and without BatchNorm after each hidden Linear,
SGD vs Backforward at lr {cfg.lr:g}, {cfg.epochs} epochs, {cfg.seeds} seeds, ICS measured on every step.
Santurkar et al. found that BatchNorm does not reduce ICS in this sense; the first two rows test it here.

{claims_table(claims, "A", "B")}

![BatchNorm curves](batchnorm_curves.png)

{_cost_table({labels[k]: v for k, v in arm.items()})}
"""


def _gain(sgd: list[list[dict]], bf: list[list[dict]]) -> list[float]:
    return [a - b for a, b in zip(area(sgd, "train_loss"), area(bf, "train_loss"), strict=True)]


# ---- warm-up and fine-tuning ----

def plan_warmup(cfg: StudyConfig, out: Path) -> list[Run]:
    pretrained = _runs("warm-sgd", cfg, method="sgd")  # the SGD-throughout runs double as the pre-trained models
    runs = (pretrained + _runs("warm-backforward", cfg, method="backforward")
            + _runs("warm-switch", cfg, method="backforward", switch_epoch=cfg.switch_epoch))
    for s in range(cfg.seeds):
        for method in ("sgd", "backforward"):
            runs.append(Run(f"finetune-{method}-s{s}", _config(cfg, method=method, seed=s, epochs=cfg.finetune_epochs),
                            start_from=pretrained[s]))
    return runs


def analyse_warmup(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    arm = {k: _seeds(metrics, f"warm-{k}", cfg) for k in ("sgd", "backforward", "switch")}
    ft = {k: _seeds(metrics, f"finetune-{k}", cfg) for k in ("sgd", "backforward")}
    warm = f"Backforward for {cfg.switch_epoch} epochs, then SGD"
    claims = [
        compare(f"{warm}: better than SGD throughout", "final validation accuracy",
                final(arm["sgd"], "val_acc"), final(arm["switch"], "val_acc")),
        compare(f"{warm}: lower final training loss than SGD throughout", "final training loss",
                final(arm["sgd"], "train_loss"), final(arm["switch"], "train_loss"), higher_is_better=False),
        compare("Backforward throughout: better than SGD throughout", "final validation accuracy",
                final(arm["sgd"], "val_acc"), final(arm["backforward"], "val_acc")),
        compare(f"Fine-tuning ({cfg.finetune_epochs} epochs after SGD) with Backforward beats SGD",
                "final validation accuracy", final(ft["sgd"], "val_acc"), final(ft["backforward"], "val_acc")),
        compare("Fine-tuning with Backforward reaches a lower training loss", "final training loss",
                final(ft["sgd"], "train_loss"), final(ft["backforward"], "train_loss"), higher_is_better=False),
    ]
    curves_figure(out / "warmup_curves.png",
                  [("from scratch", {"SGD": arm["sgd"], "Backforward": arm["backforward"], warm: arm["switch"]}),
                   ("fine-tuning an SGD model", {"SGD": ft["sgd"], "Backforward": ft["backforward"]})],
                  [("train_loss", "training loss", True), ("val_acc", "validation accuracy", False)])
    costs = {"SGD": arm["sgd"], "Backforward": arm["backforward"], warm: arm["switch"],
             "fine-tune SGD": ft["sgd"], "fine-tune Backforward": ft["backforward"]}
    return f"""## Study: warm-up and fine-tuning

The paper's MLP (784-{cfg.hidden}-10) at lr {cfg.lr:g}, {cfg.epochs} epochs, {cfg.seeds} seeds. Warm-up:
{warm}. Fine-tuning: each seed's SGD-throughout model trained {cfg.finetune_epochs} more epochs with each method.

{claims_table(claims, "SGD", "other arm")}

![warm-up curves](warmup_curves.png)

What it costs (FLOPs by the cost model of `backforward bench`; seconds measured, parallel runs share the machine):

{_cost_table(costs)}
"""


# ---- update order ----

def plan_order(cfg: StudyConfig, out: Path) -> list[Run]:
    return (_runs("order-sgd", cfg, method="sgd", depth=2)
            + _runs("order-forward", cfg, method="backforward", depth=2)
            + _runs("order-reverse", cfg, method="backforward", depth=2, order="reverse"))


def analyse_order(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    arm = {k: _seeds(metrics, f"order-{k}", cfg) for k in ("sgd", "forward", "reverse")}
    loss = {k: area(v, "train_loss") for k, v in arm.items()}
    forward = compare("Forward order (removes ICS) converges faster than SGD", "mean training loss over epochs",
                      loss["sgd"], loss["forward"], higher_is_better=False)
    reverse = compare("Reverse order (keeps ICS) converges faster than SGD", "mean training loss over epochs",
                      loss["sgd"], loss["reverse"], higher_is_better=False)
    versus = compare("Forward converges faster than reverse (A: reverse, B: forward)",
                     "mean training loss over epochs", loss["reverse"], loss["forward"], higher_is_better=False)
    accuracy = compare("Forward order performs better than SGD", "final validation accuracy",
                       final(arm["sgd"], "val_acc"), final(arm["forward"], "val_acc"))
    if forward.verdict == HOLDS and reverse.verdict != HOLDS:
        answer = "Forward wins and reverse does not: the gain comes from removing ICS."
    elif forward.verdict == HOLDS and reverse.verdict == HOLDS:
        answer = ("Both orders win: the gain comes from updating one stage at a time, not from removing ICS"
                  + (" alone (forward also beats reverse)." if versus.verdict == HOLDS else "."))
    elif reverse.verdict == HOLDS:
        answer = "Only reverse wins: whatever helps here, it is not the removal of ICS."
    else:
        answer = "Neither order beats SGD here, so there is no gain to attribute."
    curves_figure(out / "order_curves.png",
                  [("update order", {"SGD": arm["sgd"], "forward": arm["forward"], "reverse": arm["reverse"]})],
                  [("train_loss", "training loss", True), ("val_acc", "validation accuracy", False)])
    return f"""## Study: update order

MLP with 2 hidden layers of width {cfg.hidden} (3 stages), lr {cfg.lr:g}, {cfg.epochs} epochs,
{cfg.seeds} seeds. Forward updates stage 1 first (the paper); reverse updates the last stage first, so
each stage still moves alone but sees the shift of the stages before it.

{claims_table([forward, reverse, versus, accuracy], "A", "B")}

**Answer (from the verdicts above):** {answer}

![order curves](order_curves.png)

{_cost_table({"SGD": arm["sgd"], "forward": arm["forward"], "reverse": arm["reverse"]})}
"""


# ---- cost ----

COST_DEPTHS = (1, 4)


def plan_cost(cfg: StudyConfig, out: Path) -> list[Run]:
    return [run for depth in COST_DEPTHS for method in ("sgd", "backforward")
            for run in _runs(f"cost-d{depth}-{method}", cfg, method=method, depth=depth)]


def at_budget(run: Sequence[dict], budget: float, key: str) -> float:
    """Training loss of the last epoch finished within ``budget`` of ``key`` (FLOPs or seconds)."""
    within = [m for m in run if m[key] <= budget * (1 + 1e-9)]
    return within[-1]["train_loss"] if within else math.nan


def equal_budget(sgd: list[list[dict]], bf: list[list[dict]], key: str) -> tuple[list[float], list[float]]:
    """Per seed: both runs' training loss at the budget of the one that used less ``key``."""
    a, b = [], []
    for ra, rb in zip(sgd, bf, strict=True):
        budget = min(ra[-1][key], rb[-1][key]) if ra and rb else math.nan
        a.append(at_budget(ra, budget, key))
        b.append(at_budget(rb, budget, key))
    return a, b


def analyse_cost(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    claims = []
    panels_flops, panels_seconds = [], []
    for depth in COST_DEPTHS:
        sgd, bf = _seeds(metrics, f"cost-d{depth}-sgd", cfg), _seeds(metrics, f"cost-d{depth}-backforward", cfg)
        claims.append(compare(f"depth {depth}: Backforward wins per step", "mean training loss over epochs",
                              area(sgd, "train_loss"), area(bf, "train_loss"), higher_is_better=False))
        for key, unit in (("flops", "FLOP"), ("train_seconds", "second")):
            a, b = equal_budget(sgd, bf, key)
            claims.append(compare(f"depth {depth}: Backforward wins per {unit}",
                                  f"training loss at the same {unit} budget", a, b, higher_is_better=False))
        panels_flops.append((f"depth {depth}", {"SGD": sgd, "Backforward": bf}))
        panels_seconds.append((f"depth {depth}", {"SGD": sgd, "Backforward": bf}))
    curves_figure(out / "cost_flops.png", panels_flops, [("train_loss", "training loss", True)], x_key="flops",
                  x_label="FLOPs (cost model)")
    curves_figure(out / "cost_seconds.png", panels_seconds, [("train_loss", "training loss", True)],
                  x_key="train_seconds", x_label="training seconds")
    return f"""## Study: cost

SGD vs Backforward (fast engine) at depths {', '.join(map(str, COST_DEPTHS))}, lr {cfg.lr:g}, {cfg.epochs}
epochs, {cfg.seeds} seeds. "Per FLOP" and "per second" compare each pair at the budget of the run that
used less: the training loss of the last epoch finished within it. FLOPs come from the cost model
(`backforward bench` checks it against time); seconds are measured and noisier. The other studies'
tables list FLOPs and seconds per run beside their results.

{claims_table(claims)}

![loss against FLOPs](cost_flops.png)

![loss against seconds](cost_seconds.png)
"""


STUDIES = {s.name: s for s in (
    Study("depth", plan_depth, analyse_depth),
    Study("batchnorm", plan_batchnorm, analyse_batchnorm),
    Study("warmup", plan_warmup, analyse_warmup),
    Study("order", plan_order, analyse_order),
    Study("cost", plan_cost, analyse_cost),
)}


def run_study(name: str, out: Path, quick: bool = False, jobs: int = 1, data_dir: str | None = None,
              cfg: StudyConfig | None = None) -> Path:
    study = STUDIES[name]
    cfg = cfg or (QUICK if quick else FULL)
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(study.plan(cfg, out), out, jobs, data_dir, desc=f"study {name}")
    return write_section(out, name, study.analyse(cfg, results, out) + "\n" + results.settings())
