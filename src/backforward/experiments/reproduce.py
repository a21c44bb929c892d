"""``backforward reproduce``: the paper's experiments, several seeds, figures and a claims table.

1. the toy experiment; 2. Figure 1, {SGD, Backforward} × lr {0.1, 0.05, 0.01};
3. weight norms over training; 4. the paper's remedy at lr 0.1, a decaying learning
rate; 5. each claim of the paper with its numbers and a computed verdict.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .data import load
from .files import atomic_write_text, read_json
from .report import (
    Claim,
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
    toy_verdict,
    write_section,
)
from .sweep import Run, run_all
from .toy import ToyConfig, format_toy, run_toy, summarize_toy
from .train import TrainConfig

ARMS = (("sgd", "SGD"), ("backforward", "Backforward"))


@dataclass(frozen=True)
class ReproduceConfig:
    seeds: int = 5
    epochs: int = 200
    toy_seeds: int = 20
    lrs: tuple[float, ...] = (0.1, 0.05, 0.01)
    decay_lr: float = 0.1
    hidden: int = 256
    batch_size: int = 128


QUICK = ReproduceConfig(seeds=3, epochs=30, toy_seeds=10)


def run_name(method: str, lr: float, seed: int, schedule: str = "constant") -> str:
    return f"{method}-lr{lr:g}{'' if schedule == 'constant' else '-' + schedule}-s{seed}"


def plan(cfg: ReproduceConfig) -> list[Run]:
    runs = []
    for lr, schedule in [(lr, "constant") for lr in cfg.lrs] + [(cfg.decay_lr, "cosine")]:
        for method, _ in ARMS:
            for seed in range(cfg.seeds):
                runs.append(Run(run_name(method, lr, seed, schedule),
                                TrainConfig(method=method, lr=lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                            hidden=cfg.hidden, seed=seed, schedule=schedule)))
    return runs


def toy_trials(out: Path, config: ToyConfig, data_dir: str | None) -> list[dict]:
    """The toy experiment's trials, reused from ``OUT/toy.json`` when its settings and data match."""
    path = out / "toy.json"
    settings = {**asdict(config), "data_dir": str(Path(data_dir).resolve()) if data_dir else None}
    if path.exists():
        saved = read_json(path)
        if saved.get("config") == settings:
            return saved["trials"]
    trials = run_toy(load(data_dir), config)
    atomic_write_text(path, json.dumps({"config": settings, "trials": trials}, indent=1) + "\n")
    return trials


def reproduce(out: Path, quick: bool = False, jobs: int = 1, data_dir: str | None = None,
              cfg: ReproduceConfig | None = None) -> Path:
    cfg = cfg or (QUICK if quick else ReproduceConfig())
    out.mkdir(parents=True, exist_ok=True)
    toy_config = ToyConfig(seeds=cfg.toy_seeds, hidden=cfg.hidden)
    trials = toy_trials(out, toy_config, data_dir)
    results = run_all(plan(cfg), out, jobs, data_dir, desc="reproduce")
    return write_section(out, "reproduce", analyse(cfg, toy_config, trials, results, out, data_dir) + "\n"
                         + results.settings())


def arm(metrics: dict[str, list[dict]], cfg: ReproduceConfig, method: str, lr: float,
        schedule: str = "constant") -> list[list[dict]]:
    return [metrics[run_name(method, lr, s, schedule)] for s in range(cfg.seeds)]


def analyse(cfg: ReproduceConfig, toy_config: ToyConfig, trials: list[dict], metrics: dict[str, list[dict]],
            out: Path, data_dir: str | None) -> str:
    lrs = cfg.lrs
    summary = summarize_toy(trials, toy_config.zero_tol)
    toy_figure(trials, toy_config, out / "toy.png")
    panels = [(f"lr {lr:g}", {label: arm(metrics, cfg, m, lr) for m, label in ARMS}) for lr in lrs]
    curves_figure(out / "fig1.png", panels, [("train_loss", "training loss", True),
                                             ("val_acc", "validation accuracy", False)])
    curves_figure(out / "weight_norms.png", panels, [("weight_norm", "weight L2 norm", False)])
    decay_panels = [(f"lr {cfg.decay_lr:g}, {schedule}", {label: arm(metrics, cfg, m, cfg.decay_lr, schedule)
                                                        for m, label in ARMS})
                    for schedule in ("constant", "cosine")]
    curves_figure(out / "lr_decay.png", decay_panels, [("train_loss", "training loss", True),
                                                       ("val_acc", "validation accuracy", False)])

    claims = [Claim("Toy: one step at lr 1.0 learns the batch with Backforward (loss ≈ 0), not with SGD",
                    f"share of {toy_config.seeds} seeds with loss < {toy_config.zero_tol:g} (median loss)",
                    f"{summary['sgd']['reached_zero']:.0%} ({summary['sgd']['median']:.3g})",
                    f"{summary['backforward']['reached_zero']:.0%} ({summary['backforward']['median']:.3g})",
                    "", toy_verdict(summary["backforward"]["reached_zero"], summary["sgd"]["reached_zero"]))]
    if 0.1 in lrs:
        claims.append(compare("lr 0.1: similar results", "final validation accuracy",
                              final(arm(metrics, cfg, "sgd", 0.1), "val_acc"),
                              final(arm(metrics, cfg, "backforward", 0.1), "val_acc"), kind="similar"))
    for lr in [lr for lr in lrs if lr != 0.1]:
        sgd, bf = arm(metrics, cfg, "sgd", lr), arm(metrics, cfg, "backforward", lr)
        claims.append(compare(f"lr {lr:g}: Backforward converges faster", "mean training loss over epochs",
                              area(sgd, "train_loss"), area(bf, "train_loss"), higher_is_better=False))
        claims.append(compare(f"lr {lr:g}: Backforward performs better", "final validation accuracy",
                              final(sgd, "val_acc"), final(bf, "val_acc")))
    for lr in lrs:
        claims.append(compare(f"lr {lr:g}: larger weight norm without ICS", "final weight L2 norm",
                              final(arm(metrics, cfg, "sgd", lr), "weight_norm"),
                              final(arm(metrics, cfg, "backforward", lr), "weight_norm")))
    bf_const = arm(metrics, cfg, "backforward", cfg.decay_lr)
    bf_decay = arm(metrics, cfg, "backforward", cfg.decay_lr, "cosine")
    decay = compare(f"lr {cfg.decay_lr:g}: a decaying lr helps Backforward (A: constant lr, B: decay)",
                    "final validation accuracy", final(bf_const, "val_acc"), final(bf_decay, "val_acc"))
    claims.append(decay)
    claims.append(compare(f"lr {cfg.decay_lr:g} with decay: Backforward beats SGD", "final validation accuracy",
                          final(arm(metrics, cfg, "sgd", cfg.decay_lr, "cosine"), "val_acc"),
                          final(bf_decay, "val_acc")))

    rows = []
    for lr, schedule in [(lr, "constant") for lr in lrs] + [(cfg.decay_lr, "cosine")]:
        for method, label in ARMS:
            runs = arm(metrics, cfg, method, lr, schedule)
            diverged = sum(1 for r in runs if len(r) < cfg.epochs)
            rows.append([label, f"{lr:g}", schedule, _ci(final(runs, "val_acc")), _ci(final(runs, "train_loss")),
                         _ci(final(runs, "weight_norm")), f"{np.mean(final(runs, 'train_seconds')):.1f}",
                         f"{diverged}/{len(runs)}"])
    source = load(data_dir).source
    text = f"""## Reproducing the paper

Data: {source}. MLP 784-{cfg.hidden}-10 (ReLU), plain SGD (no momentum, no weight decay, no
augmentation), batch {cfg.batch_size} with `drop_last`, {cfg.epochs} epochs, seeds 0–{cfg.seeds - 1}
(a seed fixes initial weights and batch order, shared by both methods). Bands and brackets:
95% confidence interval of the mean over seeds.

### Claims

{claims_table(claims)}

### 1. Toy experiment

```
{format_toy(summary, toy_config)}
```

![toy](toy.png)

### 2. Figure 1: training loss and validation accuracy

![Figure 1](fig1.png)

{markdown_table(["method", "lr", "schedule", "final val acc", "final train loss", "final weight norm",
                 "seconds/run", "stopped early"], rows)}

### 3. Weight norms

![weight norms](weight_norms.png)

### 4. A decaying learning rate at lr {cfg.decay_lr:g} (cosine to 0 over the run)

![lr decay](lr_decay.png)
"""
    return text


def _ci(values: list[float]) -> str:
    return fmt_ci(mean_ci(values))


def toy_figure(trials: list[dict], config: ToyConfig, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    keys = [("before", "before"), ("sgd", "after SGD"), ("backforward", "after Backforward")]
    for i, (key, _) in enumerate(keys):
        values = [max(t[key], 1e-8) for t in trials]
        jitter = np.linspace(-0.15, 0.15, len(values))
        ax.scatter(np.full(len(values), i) + jitter, values, s=14, color=f"C{i}")
        ax.hlines(np.median(values), i - 0.25, i + 0.25, color="black")
    ax.axhline(config.zero_tol, color="grey", linestyle=":", label=f"tolerance {config.zero_tol:g}")
    ax.set_xticks(range(len(keys)), [label for _, label in keys])
    ax.set_yscale("log")
    ax.set_ylabel("loss on the batch")
    ax.set_title(f"Toy: one step at lr {config.lr:g}, {len(trials)} seeds (bar: median)")
    ax.legend()
    save_figure(fig, path)
