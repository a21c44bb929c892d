"""``backforward study NAME``: the questions the paper left open, each a report section with verdicts.

- ``lr-control``  is Backforward's gain just a larger effective step? SGD at slightly larger lrs, and
                  each method at its own best lr (tuned the same way, on validation data)
- ``depth``       does the advantage grow with depth? two initialisations, 1 to 16 hidden layers;
                  does the ICS measured on SGD's trajectory predict where Backforward gains?
- ``batchnorm``   does BatchNorm reduce ICS (Linear stages only, scale-free, early and late)? the MLP
                  and a 25-layer deep linear network; how does Backforward do with BatchNorm?
- ``order``       forward vs reverse vs SGD at several lrs and two depths
- ``arch``        beyond the MLP: a small CNN and a residual MLP
- ``optimizer``   beyond SGD: momentum and Adam as Backforward's base optimizer
- ``warmup``      Backforward for the first epochs, or for fine-tuning
- ``cost``        per step, per FLOP, per second

Runs are declared as typed arms (``arms.Arm``: a TrainConfig and its seeds); a run's name is
computed from its settings, so studies share the runs they have in common. A seed fixes initial
weights and batch order for every arm, so arms are compared pair by pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arms import Arm, arm, longest_first, plan
from .models import linear_stage_names
from .report import (
    ADVANTAGE,
    CHANCE_LOSS,
    CORRELATION,
    EQUIVALENT,
    FAILS,
    FINAL_LOSS,
    FLOP_LOSS,
    HIGHER,
    HOLDS,
    ICS_ANGLE,
    ICS_SHIFT,
    LOWER,
    SECOND_LOSS,
    SMALL,
    UNSURE,
    Claim,
    area,
    band,
    claims_table,
    compare,
    converges_faster,
    correlate,
    count_verdicts,
    curves_figure,
    decide,
    diverged_line,
    family_note,
    final,
    fmt_ci,
    forest_figure,
    markdown_table,
    mean_ci,
    performs_better,
    pyplot,
    save_figure,
    training_seconds,
    write_section,
)
from .sweep import run_all
from .train import build_model

WINS = (HOLDS, SMALL)  # verdicts that say B is better than A (by at least, or below, the minimum effect)


@dataclass(frozen=True)
class StudyConfig:
    seeds: int = 5
    epochs: int = 20
    lr: float = 0.05                        # the single learning rate of the studies that use one
    hidden: int = 256
    ics_every: int = 4                      # SGD runs measure ICS on every k-th step
    # depth
    lrs: tuple[float, ...] = (0.1, 0.05, 0.01)
    depths: tuple[int, ...] = (1, 2, 4, 8, 16)
    inits: tuple[str, ...] = ("default", "kaiming")
    # lr-control
    control_depths: tuple[int, ...] = (1, 2)
    multipliers: tuple[float, ...] = (1.0, 1.05, 1.1, 1.2, 1.5)
    lr_grid: tuple[float, ...] = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4)
    tuning_seeds: int = 3                   # seeds 100, 101, ...: apart from the seeds compared
    # batchnorm
    bn_depth: int = 2
    dln_depth: int = 24                     # hidden layers: 25 Linear layers in all
    dln_hidden: int = 128
    dln_lr: float = 0.01
    dln_ics_every: int = 8
    # order, arch, optimizer, warmup, cost
    order_depths: tuple[int, ...] = (2, 4)
    res_blocks: int = 3
    arch_depth: int = 2
    momentum: float = 0.9
    momentum_lr: float = 0.005              # effective step lr / (1 − momentum) = 0.05, the paper's middle lr
    adam_lr: float = 0.001                  # Adam's default
    switch_epoch: int = 5
    finetune_epochs: int = 10
    cost_depths: tuple[int, ...] = (1, 4)


FULL = StudyConfig()
QUICK = StudyConfig(seeds=3, epochs=3, lrs=(0.01,), depths=(1, 4, 16), control_depths=(1,), multipliers=(1.0, 1.1, 1.5),
                    lr_grid=(0.025, 0.05, 0.1), tuning_seeds=2, order_depths=(2,), res_blocks=2, switch_epoch=2,
                    finetune_epochs=2, cost_depths=(1, 4))

Plan = Callable[[StudyConfig, Path, dict[str, list[dict]]], list[Arm]]


@dataclass(frozen=True)
class Study:
    name: str
    plan: Plan          # the arms to run, given the metrics of the runs finished so far (for tuned arms)
    analyse: Callable[[StudyConfig, dict[str, list[dict]], Path], str]


# ---- the arms the studies share ----

def mlp_arm(cfg: StudyConfig, method: str, lr: float | None = None, depth: int = 1, meter: bool = True,
            **settings) -> Arm:
    """The studies' MLP run, shared between studies: SGD measures ICS (every ``ics_every`` steps) unless
    ``meter`` is False; Backforward does not need to (its gain is measured against SGD)."""
    meter = {"track_ics": True, "ics_every": cfg.ics_every} if method == "sgd" and meter else {}
    return arm(cfg.seeds, method=method, lr=cfg.lr if lr is None else lr, epochs=cfg.epochs, hidden=cfg.hidden,
               depth=depth, **meter, **settings)


def pair(cfg: StudyConfig, lr: float | None = None, depth: int = 1, **settings) -> tuple[Arm, Arm]:
    return mlp_arm(cfg, "sgd", lr, depth, **settings), mlp_arm(cfg, "backforward", lr, depth, **settings)


def ics_per_epoch(run: Sequence[dict], arm_: Arm, key: str) -> list[float]:
    """Per epoch: the mean over Linear stages 2..n (stage 1's is 0 by definition) of ``key``
    ("rel_shift" for ‖G − G'‖/‖G‖, "angle" for 1 − cos∠(G, G'))."""
    stages = linear_stage_names(build_model(arm_.config))[1:]
    values = []
    for m in run:
        ics = m.get("ics", {})
        per_stage = [1 - ics[s]["grad_cosine"] if key == "angle" else ics[s][key] for s in stages if s in ics]
        finite = [v for v in per_stage if math.isfinite(v)]
        values.append(float(np.mean(finite)) if finite else math.nan)
    return values


def ics_of(runs: Sequence[Sequence[dict]], arm_: Arm, key: str, epoch: int | None = None) -> list[float]:
    """Per run: ICS in one epoch (1-based; -1 for the last), or the mean over epochs."""
    out = []
    for r in runs:
        series = ics_per_epoch(r, arm_, key)
        if not series or len(r) < arm_.epochs:
            out.append(math.nan)
        elif epoch is None:
            out.append(_finite_mean(series))
        else:
            out.append(series[epoch - 1 if epoch > 0 else epoch])
    return out


def advantage(sgd: Sequence[Sequence[dict]], bf: Sequence[Sequence[dict]], epochs: int) -> list[float]:
    """Per seed: (SGD − Backforward) / SGD mean training loss; > 0 where Backforward is lower."""
    return [(a - b) / a if a else math.nan
            for a, b in zip(area(sgd, "train_loss", epochs), area(bf, "train_loss", epochs), strict=True)]


def trained(runs: Sequence[Sequence[dict]], epochs: int) -> bool:
    """An arm trained if its mean final training loss is below 99% of a uniform guess's (diverged runs: not)."""
    losses = final(runs, "train_loss", epochs)
    return bool(np.isfinite(losses).any()) and float(np.nanmean(losses)) < 0.99 * CHANCE_LOSS


def cost_table(arms: dict[str, list[list[dict]]]) -> str:
    rows = []
    for label, runs in arms.items():
        rows.append([label, fmt_ci(mean_ci(final(runs, "val_acc"))), fmt_ci(mean_ci(area(runs, "train_loss"))),
                     f"{np.mean(final(runs, 'flops')):.3g}", f"{np.mean(final(runs, 'train_seconds')):.1f}"])
    return markdown_table(["arm", "final val acc", "mean train loss", "FLOPs/run", "train seconds/run"], rows)


def header(title: str, name: str, cfg: StudyConfig, runs: Sequence[Sequence[dict]]) -> str:
    form = "quick form (`--quick`)" if cfg == QUICK else "full form" if cfg == FULL else "custom settings"
    return (f"## Study: {title}\n\nWritten by `backforward study {name}`, {form}: {cfg.seeds} seeds, {cfg.epochs} "
            "epochs unless stated. Training took "
            f"{training_seconds(runs) / 60:.1f} process-minutes (sum over this section's runs; runs shared with other "
            "sections count here too).")


def verdict_block(claims: list[Claim], name: str, out: Path, title: str, named: dict[str, list[list[dict]]],
                  epochs: int, a: str = "A", b: str = "B") -> str:
    """The section's verdict table, its family note, the diverged runs of ``named`` arms, its effects figure."""
    forest_figure(claims, out / f"{name}_effects.png", title)
    parts = [claims_table(claims, a, b), family_note(claims), diverged_line(named, epochs),
             f"![effects]({name}_effects.png)"]
    return "\n\n".join(p for p in parts if p)


# ---- lr-control ----

TUNING_SEED0 = 100


def control_arms(cfg: StudyConfig, depth: int) -> tuple[list[Arm], Arm]:
    """SGD at lr × each multiplier (the ×1 arm is the studies' shared SGD run) and Backforward at lr."""
    return ([mlp_arm(cfg, "sgd", cfg.lr * m, depth, meter=m == 1) for m in cfg.multipliers],
            mlp_arm(cfg, "backforward", None, depth))


def tuning_arm(cfg: StudyConfig, method: str, lr: float, depth: int) -> Arm:
    return arm(range(TUNING_SEED0, TUNING_SEED0 + cfg.tuning_seeds), method=method, lr=lr, epochs=cfg.epochs,
               hidden=cfg.hidden, depth=depth)


def best_lr(cfg: StudyConfig, metrics: dict[str, list[dict]], method: str, depth: int) -> float | None:
    """The grid lr with the highest mean final validation accuracy over the tuning seeds (a tie: the lower
    validation loss); None until every tuning run is there."""
    scores = []
    for lr in cfg.lr_grid:
        a = tuning_arm(cfg, method, lr, depth)
        if any(r.name not in metrics for r in a.runs()):
            return None
        runs = a.of(metrics)
        acc, loss = _finite_mean(final(runs, "val_acc", cfg.epochs)), _finite_mean(final(runs, "val_loss", cfg.epochs))
        scores.append((acc if math.isfinite(acc) else -math.inf, -loss if math.isfinite(loss) else -math.inf, lr))
    return max(scores)[2]


def _finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (diverged runs left out); NaN if there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def plan_lr_control(cfg: StudyConfig, out: Path, metrics: dict[str, list[dict]]) -> list[Arm]:
    arms: list[Arm] = []
    for depth in cfg.control_depths:
        sgd, bf = control_arms(cfg, depth)
        arms += sgd + [bf] + [tuning_arm(cfg, m, lr, depth) for lr in cfg.lr_grid for m in ("sgd", "backforward")]
        best = {m: best_lr(cfg, metrics, m, depth) for m in ("sgd", "backforward")}
        arms += [mlp_arm(cfg, m, lr, depth) for m, lr in best.items() if lr is not None]
    return arms


def analyse_lr_control(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    claims, answers, grid_rows, used, named = [], [], [], [], {}
    per_depth: dict[int, tuple[list[Claim], list[Claim]]] = {}
    for depth in cfg.control_depths:
        sgd_arms, bf_arm = control_arms(cfg, depth)
        bf = bf_arm.of(metrics)
        multiplied = [converges_faster(f"depth {depth}: Backforward at lr {cfg.lr:g} converges faster than SGD at "
                                       f"{m:g}× ({cfg.lr * m:.4g})", a.of(metrics), bf, cfg.epochs)
                      for m, a in zip(cfg.multipliers, sgd_arms, strict=True)]
        best = {m: best_lr(cfg, metrics, m, depth) for m in ("sgd", "backforward")}
        tuned_sgd, tuned_bf = (mlp_arm(cfg, m, best[m], depth).of(metrics) for m in ("sgd", "backforward"))
        where = f"depth {depth}, each at its best lr (SGD {best['sgd']:g}, Backforward {best['backforward']:g})"
        tuned = [performs_better(f"{where}: Backforward performs better", tuned_sgd, tuned_bf, cfg.epochs),
                 converges_faster(f"{where}: Backforward converges faster", tuned_sgd, tuned_bf, cfg.epochs)]
        per_depth[depth] = (multiplied, tuned)
        claims += multiplied + tuned
        used += [r for a in sgd_arms for r in a.of(metrics)] + bf + tuned_sgd + tuned_bf
        named |= {f"depth {depth}, SGD at {m:g}×": a.of(metrics)
                  for m, a in zip(cfg.multipliers, sgd_arms, strict=True)}
        named |= {f"depth {depth}, Backforward at lr {cfg.lr:g}": bf, f"depth {depth}, tuned SGD": tuned_sgd,
                  f"depth {depth}, tuned Backforward": tuned_bf}
        for lr in cfg.lr_grid:
            cells = []
            for m in ("sgd", "backforward"):
                runs = tuning_arm(cfg, m, lr, depth).of(metrics)
                named[f"depth {depth}, tuning {'SGD' if m == 'sgd' else 'Backforward'} at lr {lr:g}"] = runs
                used += runs
                cells.append(fmt_ci(mean_ci(final(runs, "val_acc", cfg.epochs)))
                             + (" ← best" if lr == best[m] else ""))
            grid_rows.append([depth, f"{lr:g}", *cells])
    decide(claims)
    for depth, (multiplied, tuned) in per_depth.items():
        answers.append(control_answer(depth, cfg, multiplied, tuned))
    control_figure(cfg, metrics, out / "lr_control.png")
    return f"""{header("is the gain a larger effective step?", "lr-control", cfg, used)}

Backforward at lr {cfg.lr:g} against SGD at lr × {', '.join(f'{m:g}' for m in cfg.multipliers)} (the paper's MLP and
one with {max(cfg.control_depths)} hidden layers), and each method at its own best lr: both searched the same grid
({', '.join(f'{lr:g}' for lr in cfg.lr_grid)}) on {cfg.tuning_seeds} tuning seeds (from {TUNING_SEED0}, apart from the
compared seeds 0–{cfg.seeds - 1}), best = highest mean final validation accuracy (a tie: lower validation loss),
then rerun on the compared seeds. Selection and comparison use the same 1,000 validation digits
(there is no third split), which favours both methods alike.

{verdict_block(claims, "lr_control", out, "lr-control: Backforward against SGD with a larger or tuned step", named,
               cfg.epochs)}

**Answer (computed from the verdicts above):** {' '.join(answers)}

![lr control](lr_control.png)

Tuning grid (final validation accuracy, tuning seeds):

{markdown_table(["depth", "lr", "SGD", "Backforward"], grid_rows)}
"""


def control_answer(depth: int, cfg: StudyConfig, multiplied: list[Claim], tuned: list[Claim]) -> str:
    lost = next(((m, c) for m, c in zip(cfg.multipliers, multiplied, strict=True) if c.verdict not in WINS), None)
    if multiplied[0].verdict not in WINS:
        step = (f"At depth {depth}, Backforward does not converge faster than SGD at the same lr "
                f"({multiplied[0].verdict}), so there is no gain to explain by the step size.")
    elif lost is None:
        step = (f"At depth {depth}, Backforward converges faster than SGD even with a {max(cfg.multipliers):g}× "
                "larger step, so its gain is more than a larger effective step of that size.")
    else:
        against = {FAILS: "SGD converges faster than Backforward: the gain is smaller than what that step buys",
                   EQUIVALENT: "the two are equivalent: the gain is what that step buys, within the minimum effect",
                   UNSURE: "the comparison is inconclusive"}[lost[1].verdict]
        step = (f"At depth {depth}, Backforward converges faster than SGD at the same lr ({multiplied[0].verdict}); "
                f"against SGD with a {lost[0]:g}× larger step ({lost[1].verdict}), {against}.")
    acc, loss = tuned
    return (step + f" Each at its best lr, 'Backforward performs better' is {acc.verdict} and 'converges faster' is "
            f"{loss.verdict}.")


def control_figure(cfg: StudyConfig, metrics: dict[str, list[dict]], path: Path) -> None:
    plt = pyplot()
    depths = cfg.control_depths
    fig, axes = plt.subplots(2, len(depths), figsize=(4.6 * len(depths), 6.4), squeeze=False)
    for col, depth in enumerate(depths):
        sgd_arms, bf_arm = control_arms(cfg, depth)
        ax = axes[0][col]
        stats = [mean_ci(area(a.of(metrics), "train_loss", cfg.epochs)) for a in sgd_arms]
        ax.errorbar(cfg.multipliers, [s[0] for s in stats], yerr=_yerr(stats), fmt="o-", color="C0",
                    label="SGD at lr × multiplier")
        bf = mean_ci(area(bf_arm.of(metrics), "train_loss", cfg.epochs))
        ax.axhline(bf[0], color="C1", label=f"Backforward at lr {cfg.lr:g}")
        if math.isfinite(bf[1]):
            ax.axhspan(bf[1], bf[2], color="C1", alpha=0.2)
        ax.set_xlabel("SGD's lr multiplier")
        ax.set_ylabel("mean training loss over epochs")
        ax.set_title(f"depth {depth}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes[1][col]
        for i, m in enumerate(("sgd", "backforward")):
            stats = [mean_ci(final(tuning_arm(cfg, m, lr, depth).of(metrics), "val_acc", cfg.epochs))
                     for lr in cfg.lr_grid]
            ax.errorbar(cfg.lr_grid, [s[0] for s in stats], yerr=_yerr(stats), fmt="o-", color=f"C{i}",
                        label="SGD" if m == "sgd" else "Backforward")
        ax.set_xscale("log")
        ax.set_xlabel("lr (tuning seeds)")
        ax.set_ylabel("final validation accuracy")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def _yerr(stats: Sequence[tuple[float, float, float]]) -> list[list[float]]:
    return [[s[0] - s[1] if math.isfinite(s[1]) else 0 for s in stats],
            [s[2] - s[0] if math.isfinite(s[2]) else 0 for s in stats]]


# ---- depth ----

def depth_settings(cfg: StudyConfig) -> list[tuple[str, float, int]]:
    return [(init, lr, depth) for init in cfg.inits for lr in cfg.lrs for depth in cfg.depths]


def plan_depth(cfg: StudyConfig, out: Path, metrics: dict[str, list[dict]]) -> list[Arm]:
    return [a for init, lr, depth in depth_settings(cfg) for a in pair(cfg, lr, depth, init=init)]


def analyse_depth(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    runs = {s: tuple(a.of(metrics) for a in pair(cfg, s[1], s[2], init=s[0])) for s in depth_settings(cfg)}
    ok = {s: trained(sgd, cfg.epochs) or trained(bf, cfg.epochs) for s, (sgd, bf) in runs.items()}
    faster, better, growth = [], [], []
    for (init, lr, depth), (sgd, bf) in runs.items():
        if not ok[(init, lr, depth)]:
            continue
        where = f"{init} init, lr {lr:g}, depth {depth}"
        faster.append(converges_faster(f"{where}: Backforward converges faster", sgd, bf, cfg.epochs))
        better.append(performs_better(f"{where}: Backforward performs better", sgd, bf, cfg.epochs))
    lo = min(cfg.depths)
    for init in cfg.inits:
        for lr in cfg.lrs:
            if not ok[(init, lr, lo)]:
                continue
            for depth in [d for d in cfg.depths if d != lo and ok[(init, lr, d)]]:
                growth.append(compare(f"{init} init, lr {lr:g}: the relative advantage grows from depth {lo} (A) to "
                                      f"{depth} (B)", ADVANTAGE, advantage(*runs[(init, lr, lo)], cfg.epochs),
                                      advantage(*runs[(init, lr, depth)], cfg.epochs), HIGHER))
    points = []  # (settings, mean ICS on SGD's trajectory, mean relative advantage)
    for s, (sgd, bf) in runs.items():
        if ok[s]:
            sgd_arm = mlp_arm(cfg, "sgd", s[1], s[2], init=s[0])
            points.append((s, _finite_mean(ics_of(sgd, sgd_arm, "rel_shift")),
                           _finite_mean(advantage(sgd, bf, cfg.epochs))))
    link = correlate(f"ICS on SGD's trajectory predicts Backforward's advantage (over {len(points)} trained settings)",
                     CORRELATION, [p[1] for p in points], [p[2] for p in points], "ICS: mean ‖G − G'‖/‖G‖ (SGD)",
                     "relative advantage")
    claims = decide(faster + better + growth + [link])
    named = {f"{'SGD' if i == 0 else 'Backforward'}, {init} init, lr {lr:g}, depth {d}": pair_[i]
             for (init, lr, d), pair_ in runs.items() for i in (0, 1)}
    blowups = [f"{init} init, lr {lr:g}, depth {d}" for (init, lr, d), (sgd, bf) in runs.items()
               if trained(sgd, cfg.epochs) and all(len(r) < cfg.epochs for r in bf)]
    untrained = [f"{i} init, lr {lr:g}, depth {d}" for (i, lr, d), good in ok.items() if not good]
    deep = max(cfg.depths)
    deepest = [f"{i} init, lr {lr:g}" for (i, lr, d), (sgd, bf) in runs.items()
               if d == deep and trained(sgd, cfg.epochs) and trained(bf, cfg.epochs)]
    _depth_figures(cfg, runs, ok, points, link, out)
    answer = (f"Settings where both methods trained at {deep} hidden layers: {'; '.join(deepest) or 'none'}. "
              f"'Backforward converges faster' over the trained settings ({count_verdicts(faster)}). "
              f"'Backforward performs better' on validation accuracy ({count_verdicts(better)}). "
              f"'The relative advantage grows with depth' ({count_verdicts(growth)}). "
              f"{link.said()}. Backforward diverged in every seed where SGD trained at: "
              f"{'; '.join(blowups) or 'none'}.")
    cost_rows = []
    for (init, lr, depth), (sgd, bf) in runs.items():
        cost_rows.append([init, f"{lr:g}", depth, fmt_ci(mean_ci(area(sgd, "train_loss", cfg.epochs))),
                          fmt_ci(mean_ci(area(bf, "train_loss", cfg.epochs))),
                          fmt_ci(mean_ci(final(sgd, "val_acc", cfg.epochs))),
                          fmt_ci(mean_ci(final(bf, "val_acc", cfg.epochs))),
                          f"{np.mean(final(sgd, 'train_seconds')):.1f} / {np.mean(final(bf, 'train_seconds')):.1f}",
                          "yes" if ok[(init, lr, depth)] else "**no**"])
    return f"""{header("depth", "depth", cfg, [r for pair_ in runs.values() for rs in pair_ for r in rs])}

MLPs with {', '.join(map(str, cfg.depths))} hidden layers of width {cfg.hidden}, SGD vs Backforward at lr
{', '.join(f'{lr:g}' for lr in cfg.lrs)}, in two initialisations: PyTorch's default (the paper's code), and
Kaiming (He et al. 2015: normal, variance 2/fan_in, biases 0), declared before any run because it is
derived to keep a ReLU layer's signal variance, so deep ReLU MLPs train with it; PyTorch's default
shrinks the signal by about √6 per layer. ICS is measured on the SGD runs' own trajectory every
{cfg.ics_every} steps: ‖G − G'‖/‖G‖ on Linear stages 2..n. The advantage is taken relative to the
loss level: (SGD − Backforward) / SGD mean training loss, seed by seed.

{verdict_block(claims, "depth", out, "depth: Backforward against SGD", named, cfg.epochs)}

**Not trained** (neither method's mean final training loss below 99% of ln 10, or every run diverged; not
tested):
{'; '.join(untrained) or 'none'}.

**Answer (computed from the verdicts above):** {answer}

![depth curves](depth_curves.png)

Backforward's relative advantage against depth (mean and 95% CI over seeds; untrained settings left out):

![advantage by depth](depth_advantage.png)

Does ICS predict the gain? One point per trained setting: ICS on SGD's trajectory (mean over steps and
Linear stages 2..n) against Backforward's relative advantage. Settings differ in depth, lr and
initialisation at once, so a correlation here predicts; it does not isolate a cause.

![ICS against gain](depth_ics_gain.png)

Per-layer ICS (SGD runs, mean over the run) against layer index, lr {cfg.lr if cfg.lr in cfg.lrs else cfg.lrs[0]:g}:

![ICS by layer](depth_ics.png)

{markdown_table(["init", "lr", "depth", "SGD mean train loss", "Backforward mean train loss", "SGD final val acc",
                 "Backforward final val acc", "train seconds/run SGD / Backforward", "trained"], cost_rows)}
"""


def _depth_figures(cfg: StudyConfig, runs: dict, ok: dict, points: list, link: Claim, out: Path) -> None:
    plt = pyplot()
    panels = [(f"{init} init, lr {lr:g}", {f"{'SGD' if i == 0 else 'BF'} d{d}": runs[(init, lr, d)][i]
                                           for d in (min(cfg.depths), max(cfg.depths)) for i in (0, 1)})
              for init in cfg.inits for lr in cfg.lrs]
    curves_figure(out / "depth_curves.png", panels, [("train_loss", "training loss", True)])
    fig, axes = plt.subplots(1, len(cfg.inits), figsize=(4.6 * len(cfg.inits), 3.6), squeeze=False)
    for ax, init in zip(axes[0], cfg.inits, strict=True):
        for i, lr in enumerate(cfg.lrs):
            depths = [d for d in cfg.depths if ok[(init, lr, d)]]
            stats = [mean_ci([100 * v for v in advantage(*runs[(init, lr, d)], cfg.epochs)]) for d in depths]
            ax.errorbar(depths, [s[0] for s in stats], yerr=_yerr(stats), fmt="o-", color=f"C{i}", label=f"lr {lr:g}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden layers")
        ax.set_ylabel("(SGD − BF) / SGD mean train loss, %")
        ax.set_title(f"{init} init")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save_figure(fig, out / "depth_advantage.png")
    fig, ax = plt.subplots(figsize=(5.4, 4.0))
    markers = dict(zip(cfg.inits, "os^v", strict=False))
    dots = None
    for (init, lr, depth), x, y in points:
        dots = ax.scatter(x, 100 * y, marker=markers[init], c=[math.log2(depth)], cmap="viridis",
                          vmin=0, vmax=math.log2(max(cfg.depths)), s=20 + 30 * (len(cfg.lrs) - 1 - cfg.lrs.index(lr)))
    if dots is not None:
        bar = fig.colorbar(dots, ax=ax, ticks=[math.log2(d) for d in cfg.depths])
        bar.ax.set_yticklabels([str(d) for d in cfg.depths])
        bar.set_label("hidden layers")
    for init in cfg.inits:
        ax.scatter([], [], marker=markers[init], color="grey", label=f"{init} init")
    ax.set_xscale("log")
    ax.set_xlabel("ICS on SGD's trajectory: mean ‖G − G'‖/‖G‖")
    ax.set_ylabel("Backforward's relative advantage, %")
    e = link.evidence
    ax.set_title(f"Spearman ρ = {e.estimate:.2f} [{e.lo:.2f}, {e.hi:.2f}] over {e.n} settings ({link.verdict}); "
                 f"larger: smaller lr", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, out / "depth_ics_gain.png")
    lr = cfg.lr if cfg.lr in cfg.lrs else cfg.lrs[0]
    fig, axes = plt.subplots(1, len(cfg.inits), figsize=(4.6 * len(cfg.inits), 3.6), squeeze=False)
    for ax, init in zip(axes[0], cfg.inits, strict=True):
        for i, depth in enumerate(cfg.depths):
            sgd_arm = mlp_arm(cfg, "sgd", lr, depth, init=init)
            stages = linear_stage_names(build_model(sgd_arm.config))
            sgd = [r for r in runs[(init, lr, depth)][0] if r and "ics" in r[-1]]
            if not sgd:
                continue
            means = [_finite_mean([_finite_mean([m["ics"][s]["rel_shift"] for m in r]) for r in sgd]) for s in stages]
            ax.plot(range(1, len(stages) + 1), means, "o-", color=f"C{i}", label=f"depth {depth}", markersize=3)
        ax.set_xlabel("Linear stage index")
        ax.set_ylabel("‖G − G'‖/‖G‖")
        ax.set_title(f"{init} init, lr {lr:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out / "depth_ics.png")


# ---- batchnorm ----

def bn_arms(cfg: StudyConfig) -> dict[str, Arm]:
    """The MLP with and without BatchNorm (SGD and Backforward), and the deep linear network (SGD)."""
    dln = {"arch": "linear", "depth": cfg.dln_depth, "hidden": cfg.dln_hidden, "init": "orthogonal",
           "track_ics": True, "ics_every": cfg.dln_ics_every}
    arms = {"mlp-plain-sgd": mlp_arm(cfg, "sgd", None, cfg.bn_depth),
            "mlp-plain-backforward": mlp_arm(cfg, "backforward", None, cfg.bn_depth),
            "mlp-bn-sgd": mlp_arm(cfg, "sgd", None, cfg.bn_depth, batchnorm=True),
            "mlp-bn-backforward": mlp_arm(cfg, "backforward", None, cfg.bn_depth, batchnorm=True)}
    for bn in (False, True):
        arms[f"dln-{'bn' if bn else 'plain'}-sgd"] = arm(cfg.seeds, method="sgd", lr=cfg.dln_lr, epochs=cfg.epochs,
                                                         batchnorm=bn, **dln)
    return arms


def plan_batchnorm(cfg: StudyConfig, out: Path, metrics: dict[str, list[dict]]) -> list[Arm]:
    return list(bn_arms(cfg).values())


def analyse_batchnorm(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    arms = bn_arms(cfg)
    runs = {k: a.of(metrics) for k, a in arms.items()}
    nets = {"mlp": f"MLP ({cfg.bn_depth} hidden layers)", "dln": f"deep linear network ({cfg.dln_depth + 1} layers)"}
    ics_claims = []
    for net, net_label in nets.items():
        for epoch, when in ((1, "in epoch 1"), (-1, "in the last epoch")):
            for measure, key, tag in ((ICS_SHIFT, "rel_shift", "‖G − G'‖/‖G‖"), (ICS_ANGLE, "angle", "1 − cos")):
                plain, bn = f"{net}-plain-sgd", f"{net}-bn-sgd"
                ics_claims.append(compare(f"{net_label}: BatchNorm reduces ICS ({tag}) {when} (A: plain, B: BatchNorm; "
                                          "SGD)",
                                          measure, ics_of(runs[plain], arms[plain], key, epoch),
                                          ics_of(runs[bn], arms[bn], key, epoch), LOWER))
    e = cfg.epochs
    bn_sgd, bn_bf = runs["mlp-bn-sgd"], runs["mlp-bn-backforward"]
    with_bn = [converges_faster("MLP with BatchNorm: Backforward converges faster than SGD", bn_sgd, bn_bf, e),
               performs_better("MLP with BatchNorm: Backforward performs better than SGD", bn_sgd, bn_bf, e),
               compare("Backforward's relative advantage is larger with BatchNorm (A: plain, B: BatchNorm)", ADVANTAGE,
                       advantage(runs["mlp-plain-sgd"], runs["mlp-plain-backforward"], e),
                       advantage(runs["mlp-bn-sgd"], runs["mlp-bn-backforward"], e), HIGHER)]
    claims = decide(ics_claims + with_bn)
    _bn_figure(cfg, arms, runs, nets, out / "batchnorm_ics.png")
    labels = {"mlp-plain-sgd": "SGD", "mlp-plain-backforward": "Backforward", "mlp-bn-sgd": "SGD + BN",
              "mlp-bn-backforward": "Backforward + BN", "dln-plain-sgd": "DLN, SGD", "dln-bn-sgd": "DLN + BN, SGD"}
    curves_figure(out / "batchnorm_curves.png",
                  [("MLP without BatchNorm", {labels[k]: runs[k] for k in ("mlp-plain-sgd", "mlp-plain-backforward")}),
                   ("MLP with BatchNorm", {labels[k]: runs[k] for k in ("mlp-bn-sgd", "mlp-bn-backforward")}),
                   ("deep linear network", {labels[k]: runs[k] for k in ("dln-plain-sgd", "dln-bn-sgd")})],
                  [("train_loss", "training loss", True), ("val_acc", "validation accuracy", False)])
    answer = " ".join(f"{c.said()}." for c in claims)
    return f"""{header("BatchNorm and ICS, like for like", "batchnorm", cfg, [r for rs in runs.values() for r in rs])}

ICS is measured on the SGD runs' own trajectory (every {cfg.ics_every} steps for the MLP, {cfg.dln_ics_every} for the
deep linear network) on the **Linear stages only** (2..n: the first is 0 by definition; BatchNorm's
γ/β stages are not averaged in), scale-free: ‖G − G'‖/‖G‖ and 1 − cos∠(G, G') (Santurkar et al. 2018,
Def. 2.1), per epoch. The MLP: {cfg.bn_depth} hidden layers of width {cfg.hidden}, lr {cfg.lr:g}, with and
without BatchNorm after each hidden Linear; SGD and Backforward. The Santurkar-style arm: a deep
linear network of {cfg.dln_depth + 1} Linear layers of width {cfg.dln_hidden}, no activations, orthogonal
initialisation (Saxe et al. 2014; an exact isometry, so the plain network trains at this depth),
lr {cfg.dln_lr:g}, SGD with and without BatchNorm. Santurkar et al. found that BatchNorm does not reduce ICS
in this sense, and can raise it; the first rows test that early (epoch 1) and late (the last epoch).

{verdict_block(claims, "batchnorm", out, "BatchNorm: ICS and Backforward", runs, cfg.epochs)}

**Answer (computed from the verdicts above):** {answer}

ICS per epoch on SGD's trajectory (Linear stages 2..n; mean and 95% CI over seeds):

![ICS per epoch](batchnorm_ics.png)

![BatchNorm curves](batchnorm_curves.png)

{cost_table({labels[k]: v for k, v in runs.items()})}
"""


def _bn_figure(cfg: StudyConfig, arms: dict[str, Arm], runs: dict, nets: dict[str, str], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(nets), figsize=(4.6 * len(nets), 6.4), squeeze=False)
    for col, (net, label) in enumerate(nets.items()):
        for row, (key, axis) in enumerate((("rel_shift", "‖G − G'‖/‖G‖"), ("angle", "1 − cos∠(G, G')"))):
            ax = axes[row][col]
            for i, bn in enumerate(("plain", "bn")):
                name = f"{net}-{bn}-sgd"
                series = [[{"epoch": j + 1, "v": v} for j, v in enumerate(ics_per_epoch(r, arms[name], key))]
                          for r in runs[name]]
                band(ax, series, "v", "BatchNorm" if bn == "bn" else "plain", f"C{i}")
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_ylabel(axis)
            ax.set_title(label if row == 0 else "")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    save_figure(fig, path)


# ---- update order ----

def order_arms(cfg: StudyConfig, depth: int, lr: float) -> dict[str, Arm]:
    sgd, forward = pair(cfg, lr, depth)
    return {"sgd": sgd, "forward": forward, "reverse": mlp_arm(cfg, "backforward", lr, depth, order="reverse")}


def plan_order(cfg: StudyConfig, out: Path, metrics: dict[str, list[dict]]) -> list[Arm]:
    return [a for d in cfg.order_depths for lr in cfg.lrs for a in order_arms(cfg, d, lr).values()]


def analyse_order(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    claims, settings, panels, used, named = [], [], [], [], {}
    for depth in cfg.order_depths:
        for lr in cfg.lrs:
            runs = {k: a.of(metrics) for k, a in order_arms(cfg, depth, lr).items()}
            used += [r for rs in runs.values() for r in rs]
            named |= {f"{k}, depth {depth}, lr {lr:g}": v for k, v in runs.items()}
            where, e = f"depth {depth}, lr {lr:g}", cfg.epochs
            trio = [converges_faster(f"{where}: forward order (removes ICS) converges faster than SGD", runs["sgd"],
                                     runs["forward"], e),
                    converges_faster(f"{where}: reverse order (keeps ICS) converges faster than SGD", runs["sgd"],
                                     runs["reverse"], e),
                    converges_faster(f"{where}: forward converges faster than reverse (A: reverse, B: forward)",
                                     runs["reverse"], runs["forward"], e)]
            claims += trio
            settings.append((where, trio))
            panels.append((where, {"SGD": runs["sgd"], "forward": runs["forward"], "reverse": runs["reverse"]}))
    decide(claims)
    patterns = [(where, order_pattern(*trio)) for where, trio in settings]
    answer = "; ".join(f"{where}: {p}" for where, p in patterns)
    consistent = sum(1 for _, p in patterns if p.startswith("consistent"))
    summary = f"the pattern is consistent with removing ICS in {consistent} of {len(patterns)} settings. {answer}."
    curves_figure(out / "order_curves.png", panels, [("train_loss", "training loss", True)])
    return f"""{header("update order", "order", cfg, used)}

MLPs with {' and '.join(map(str, cfg.order_depths))} hidden layers of width {cfg.hidden}, lr
{', '.join(f'{lr:g}' for lr in cfg.lrs)}. Forward updates stage 1 first (the paper); reverse updates the
last stage first, so each stage still moves alone but its gradient does not see the earlier stages'
new weights. Reverse order is not a clean control: it also lets each earlier stage see the later
stages' new weights (a look-ahead shift of its own), so "forward wins and reverse does not" is
*consistent with* the gain coming from removing ICS; it does not prove it.

{verdict_block(claims, "order", out, "update order", named, cfg.epochs)}

**Answer (computed from the verdicts above):** {summary}

![order curves](order_curves.png)
"""


def order_pattern(forward: Claim, reverse: Claim, versus: Claim) -> str:
    """What one setting's three order verdicts allow us to say, no more, with the verdicts."""
    if forward.verdict not in WINS:
        text = "forward does not beat SGD: no gain to attribute"
    elif reverse.verdict in WINS:
        text = ("both orders beat SGD: reverse, which keeps ICS, gains too, so the gain is not shown to come from "
                "removing ICS")
    elif versus.verdict in WINS:
        text = "consistent with removing ICS: forward beats SGD and reverse, and reverse does not beat SGD"
    else:
        text = "forward beats SGD, but not reverse: undecided"
    return (f"{text} (forward vs SGD: {forward.verdict}; reverse vs SGD: {reverse.verdict}; forward vs reverse: "
            f"{versus.verdict})")


# ---- beyond the MLP and beyond SGD ----

def arch_arms(cfg: StudyConfig) -> dict[str, tuple[Arm, Arm]]:
    return {"small CNN (2 conv + linear, fast engine)": pair(cfg, None, 1, arch="cnn"),
            f"residual MLP ({cfg.res_blocks} blocks, closure engine)": pair(cfg, None, cfg.res_blocks, arch="resmlp")}


def optimizer_arms(cfg: StudyConfig) -> dict[str, tuple[Arm, Arm]]:
    return {f"SGD + momentum {cfg.momentum:g}, lr {cfg.momentum_lr:g}": pair(cfg, cfg.momentum_lr, cfg.arch_depth,
                                                                            momentum=cfg.momentum),
            f"Adam, lr {cfg.adam_lr:g}": pair(cfg, cfg.adam_lr, cfg.arch_depth, base="adam")}


def plan_arch(cfg: StudyConfig, out: Path, metrics: dict[str, list[dict]]) -> list[Arm]:
    return [a for p in arch_arms(cfg).values() for a in p]


def plan_optimizer(cfg: StudyConfig, out: Path, metrics: dict[str, list[dict]]) -> list[Arm]:
    return [a for p in optimizer_arms(cfg).values() for a in p]


def _pairs_section(cfg: StudyConfig, metrics: dict, out: Path, name: str, title: str, arms: dict,
                   intro: str) -> str:
    claims, panels, costs = [], [], {}
    for label, (sgd_arm, bf_arm) in arms.items():
        sgd, bf = sgd_arm.of(metrics), bf_arm.of(metrics)
        claims.append(converges_faster(f"{label}: Backforward converges faster", sgd, bf, cfg.epochs))
        claims.append(performs_better(f"{label}: Backforward performs better", sgd, bf, cfg.epochs))
        panels.append((label, {"plain": sgd, "Backforward": bf}))
        costs[f"{label}, plain"], costs[f"{label}, Backforward"] = sgd, bf
    decide(claims)
    curves_figure(out / f"{name}_curves.png", panels, [("train_loss", "training loss", True),
                                                       ("val_acc", "validation accuracy", False)])
    return f"""{header(title, name, cfg, [r for rs in costs.values() for r in rs])}

{intro}

{verdict_block(claims, name, out, title, costs, cfg.epochs, "plain step", "Backforward")}

**Answer (computed from the verdicts above):** {' '.join(f'{c.said()}.' for c in claims)}

![{name} curves]({name}_curves.png)

{cost_table(costs)}
"""


def analyse_arch(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    intro = (f"Plain SGD against Backforward over SGD, lr {cfg.lr:g}, on two models that are not the paper's MLP: "
             f"the small CNN of `backforward bench` (3 stages) and a residual MLP (an input layer, {cfg.res_blocks} "
             f"blocks x → relu(x + W₂ relu(W₁ x)) of width {cfg.hidden}, a head: {2 + 2 * cfg.res_blocks} stages), "
             "which is not a chain, so Backforward runs it with the closure engine. Default initialisation.")
    return _pairs_section(cfg, metrics, out, "arch", "beyond the MLP", arch_arms(cfg), intro)


def analyse_optimizer(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    effective = cfg.momentum_lr / (1 - cfg.momentum)
    intro = (f"The MLP with {cfg.arch_depth} hidden layers; the base optimizer steps each stage in its own pass (its "
             f"state, e.g. momentum, advances once per step). Momentum {cfg.momentum:g} at lr {cfg.momentum_lr:g} "
             f"(effective step lr/(1 − momentum) = {effective:g}) and Adam at lr {cfg.adam_lr:g} (its default); "
             "declared, not tuned.")
    return _pairs_section(cfg, metrics, out, "optimizer", "beyond SGD", optimizer_arms(cfg), intro)


# ---- warm-up and fine-tuning ----

def warmup_arms(cfg: StudyConfig, out: Path) -> dict[str, Arm]:
    sgd, bf = pair(cfg)
    arms = {"sgd": sgd, "backforward": bf, "switch": bf.but(switch_epoch=cfg.switch_epoch)}
    # Fine-tuning starts from each seed's SGD-throughout model (the sweep finds its folder).
    for method in ("sgd", "backforward"):
        arms[f"finetune-{method}"] = arm(sgd.seeds, method=method, lr=cfg.lr, epochs=cfg.finetune_epochs,
                                         hidden=cfg.hidden).starting_from(sgd)
    return arms


def plan_warmup(cfg: StudyConfig, out: Path, metrics: dict[str, list[dict]]) -> list[Arm]:
    return list(warmup_arms(cfg, out).values())


def analyse_warmup(cfg: StudyConfig, metrics: dict[str, list[dict]], out: Path) -> str:
    arms = warmup_arms(cfg, out)
    runs = {k: arms[k].of(metrics) for k in ("sgd", "backforward", "switch")}
    ft = {m: arms[f"finetune-{m}"].of(metrics) for m in ("sgd", "backforward")}
    e, fe = cfg.epochs, cfg.finetune_epochs
    warm = f"Backforward for {cfg.switch_epoch} epochs, then SGD"
    claims = decide([
        performs_better(f"{warm}: better than SGD throughout", runs["sgd"], runs["switch"], e),
        compare(f"{warm}: lower final training loss than SGD throughout", FINAL_LOSS,
                final(runs["sgd"], "train_loss", e), final(runs["switch"], "train_loss", e), LOWER),
        performs_better("Backforward throughout: better than SGD throughout", runs["sgd"], runs["backforward"], e),
        performs_better(f"Fine-tuning ({fe} epochs after SGD) with Backforward beats SGD", ft["sgd"],
                        ft["backforward"], fe),
        compare("Fine-tuning with Backforward reaches a lower training loss", FINAL_LOSS,
                final(ft["sgd"], "train_loss", fe), final(ft["backforward"], "train_loss", fe), LOWER),
    ])
    curves_figure(out / "warmup_curves.png",
                  [("from scratch", {"SGD": runs["sgd"], "Backforward": runs["backforward"], warm: runs["switch"]}),
                   ("fine-tuning an SGD model", {"SGD": ft["sgd"], "Backforward": ft["backforward"]})],
                  [("train_loss", "training loss", True), ("val_acc", "validation accuracy", False)])
    costs = {"SGD": runs["sgd"], "Backforward": runs["backforward"], warm: runs["switch"],
             "fine-tune SGD": ft["sgd"], "fine-tune Backforward": ft["backforward"]}
    return f"""{header("warm-up and fine-tuning", "warmup", cfg, [r for rs in costs.values() for r in rs])}

The paper's MLP (784-{cfg.hidden}-10) at lr {cfg.lr:g}. Warm-up: {warm}. Fine-tuning: each seed's
SGD-throughout model trained {fe} more epochs with each method.

{verdict_block(claims, "warmup", out, "warm-up and fine-tuning", runs, cfg.epochs, "SGD", "other arm")}

**Answer (computed from the verdicts above):** {' '.join(f'{c.said()}.' for c in claims)}

![warm-up curves](warmup_curves.png)

What it costs (FLOPs by the cost model of `backforward bench`; seconds measured, parallel runs share the machine):

{cost_table(costs)}
"""


# ---- cost ----

def plan_cost(cfg: StudyConfig, out: Path, metrics: dict[str, list[dict]]) -> list[Arm]:
    return [a for depth in cfg.cost_depths for a in pair(cfg, None, depth)]


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
    claims, panels, used, named = [], [], [], {}
    for depth in cfg.cost_depths:
        sgd, bf = (a.of(metrics) for a in pair(cfg, None, depth))
        used += sgd + bf
        named |= {f"SGD, depth {depth}": sgd, f"Backforward, depth {depth}": bf}
        claims.append(converges_faster(f"depth {depth}: Backforward wins per step", sgd, bf, cfg.epochs))
        for key, measure, unit in (("flops", FLOP_LOSS, "FLOP"), ("train_seconds", SECOND_LOSS, "second")):
            a, b = equal_budget(sgd, bf, key)
            claims.append(compare(f"depth {depth}: Backforward wins per {unit}", measure, a, b, LOWER))
        panels.append((f"depth {depth}", {"SGD": sgd, "Backforward": bf}))
    decide(claims)
    curves_figure(out / "cost_flops.png", panels, [("train_loss", "training loss", True)], x_key="flops",
                  x_label="FLOPs (cost model)")
    curves_figure(out / "cost_seconds.png", panels, [("train_loss", "training loss", True)],
                  x_key="train_seconds", x_label="training seconds")
    return f"""{header("cost", "cost", cfg, used)}

SGD vs Backforward (fast engine) at depths {', '.join(map(str, cfg.cost_depths))}, lr {cfg.lr:g}. "Per FLOP" and
"per second" compare each pair at the budget of the run that used less: the training loss of the last
epoch finished within it. FLOPs come from the cost model (`backforward bench` checks it against time);
seconds are measured and noisier (ICS metering on SGD runs is not counted). The other studies'
tables list FLOPs and seconds per run beside their results.

{verdict_block(claims, "cost", out, "cost", named, cfg.epochs)}

**Answer (computed from the verdicts above):** {' '.join(f'{c.said()}.' for c in claims)}

![loss against FLOPs](cost_flops.png)

![loss against seconds](cost_seconds.png)
"""


STUDIES = {s.name: s for s in (
    Study("lr-control", plan_lr_control, analyse_lr_control),
    Study("depth", plan_depth, analyse_depth),
    Study("batchnorm", plan_batchnorm, analyse_batchnorm),
    Study("order", plan_order, analyse_order),
    Study("arch", plan_arch, analyse_arch),
    Study("optimizer", plan_optimizer, analyse_optimizer),
    Study("warmup", plan_warmup, analyse_warmup),
    Study("cost", plan_cost, analyse_cost),
)}


def run_study(name: str, out: Path, quick: bool = False, jobs: int = 1, data_dir: str | None = None,
              cfg: StudyConfig | None = None) -> Path:
    """Run a study's arms (again while its plan grows: tuned arms follow their tuning runs), then analyse."""
    study = STUDIES[name]
    cfg = cfg or (QUICK if quick else FULL)
    out.mkdir(parents=True, exist_ok=True)
    results = None
    while True:  # the plan may grow once runs are read: tuned arms follow their tuning runs
        runs = plan(study.plan(cfg, out, results or {}))
        if results is not None and {r.name for r in runs} <= set(results):
            break
        results = run_all(longest_first(runs), out, jobs, data_dir, desc=f"study {name}")
    return write_section(out, name, study.analyse(cfg, results, out) + "\n" + results.settings())

