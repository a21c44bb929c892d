"""``backforward reproduce``: the paper's experiments, several seeds, figures and a claims table.

1. the toy experiment, in the paper's setting and in arms that change one setting each;
2. Figure 1, {SGD, Backforward} × lr {0.1, 0.05, 0.01}; 3. weight norms and the
generalisation gap (the paper's "ICS regularises"); 4. the paper's remedy at lr 0.1, a
decaying learning rate; each claim of the paper with its numbers and a computed verdict,
and a table of where this rerun deviates from the paper and why.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .arms import Arm, arm, longest_first, plan
from .data import EMBEDDED_SOURCE, MEAN, STD, load
from .files import atomic_write_text, read_json
from .report import (
    GAP,
    HIGHER,
    LOWER,
    SIMILAR,
    TOY_SHARE,
    TOY_SIGN,
    VAL_ACC,
    WEIGHT_NORM,
    Claim,
    claims_table,
    compare,
    compare_shares,
    compare_signs,
    converges_faster,
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
from .toy import PAPER, ToyConfig, change, format_toy, run_toy, summarize_toy, toy_arms

METHODS = (("sgd", "SGD"), ("backforward", "Backforward"))
ROBUST_SHARE = 0.9  # the toy claim is robust if Backforward reaches ≈ 0 in this share of seeds in every arm


@dataclass(frozen=True)
class ReproduceConfig:
    seeds: int = 5
    epochs: int = 200
    toy: ToyConfig = PAPER
    lrs: tuple[float, ...] = (0.1, 0.05, 0.01)
    decay_lr: float = 0.1
    hidden: int = 256
    batch_size: int = 128


QUICK = ReproduceConfig(seeds=3, epochs=20)


def training_arm(cfg: ReproduceConfig, method: str, lr: float, schedule: str = "constant") -> Arm:
    """One arm of Figure 1 (or the decay arm): the paper's MLP, also evaluated on its training set."""
    return arm(cfg.seeds, method=method, lr=lr, epochs=cfg.epochs, batch_size=cfg.batch_size, hidden=cfg.hidden,
               schedule=schedule, eval_train=True)


def settings(cfg: ReproduceConfig) -> list[tuple[float, str]]:
    return [(lr, "constant") for lr in cfg.lrs] + [(cfg.decay_lr, "cosine")]


def toy_trials(out: Path, arms: list[ToyConfig], data_dir: str | None) -> list[list[dict]]:
    """Each toy arm's trials, reused from ``OUT/toy.json`` where its settings and data match."""
    path = out / "toy.json"
    data = load(data_dir)
    saved = read_json(path) if path.exists() else {}
    cached = {json.dumps(a["config"], sort_keys=True): a["trials"] for a in saved.get("arms", [])
              if saved.get("data") == data.source}
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 4: more threads only wait on each other, badly on a busy machine
    try:
        for config in arms:
            key = json.dumps(asdict(config), sort_keys=True)
            results.append(cached[key] if key in cached else run_toy(data, config))
    finally:
        torch.set_num_threads(threads)
    atomic_write_text(path, json.dumps({"data": data.source, "arms": [{"config": asdict(c), "trials": t}
                                                                      for c, t in zip(arms, results, strict=True)]},
                                       indent=1) + "\n")
    return results


def reproduce(out: Path, quick: bool = False, jobs: int = 1, data_dir: str | None = None,
              cfg: ReproduceConfig | None = None) -> Path:
    cfg = cfg or (QUICK if quick else ReproduceConfig())
    out.mkdir(parents=True, exist_ok=True)
    arms = toy_arms(replace(cfg.toy, hidden=cfg.hidden))
    trials = toy_trials(out, arms, data_dir)
    runs = plan(training_arm(cfg, m, lr, s) for lr, s in settings(cfg) for m, _ in METHODS)
    metrics = run_all(longest_first(runs), out, jobs, data_dir, desc="reproduce")
    text = analyse(cfg, arms, trials, metrics, out, load(data_dir).source)
    return write_section(out, "reproduce", text + "\n" + metrics.settings())


def toy_claims(arms: list[ToyConfig], trials: list[list[dict]]) -> list[Claim]:
    claims = []
    for config, runs in zip(arms, trials, strict=True):
        where = change(config, arms[0])
        claims.append(compare_shares(f"Toy ({where}): Backforward reaches loss ≈ 0 more often than SGD", TOY_SHARE,
                                     [t["sgd"] < config.zero_tol for t in runs],
                                     [t["backforward"] < config.zero_tol for t in runs]))
        claims.append(compare_signs(f"Toy ({where}): Backforward's loss after the step is lower than SGD's", TOY_SIGN,
                                    [t["sgd"] for t in runs], [t["backforward"] for t in runs], LOWER))
    return claims


def toy_sentence(arms: list[ToyConfig], trials: list[list[dict]], claims: list[Claim]) -> str:
    """Computed: in how many arms the McNemar verdict holds, the range of shares, robust or not."""
    more_often = claims[0::2]
    n_hold = sum(1 for c in more_often if c.verdict == "holds")
    share = {m: [float(np.mean([t[m] < c.zero_tol for t in runs])) for c, runs in zip(arms, trials, strict=True)]
             for m in ("sgd", "backforward")}
    robust = n_hold == len(arms) and min(share["backforward"]) >= ROBUST_SHARE
    return (f"Backforward reaches loss ≈ 0 more often than SGD (verdict *holds*) in {n_hold} of {len(arms)} arms "
            f"({', '.join(c.verdict for c in more_often)}); across arms it reaches ≈ 0 in "
            f"{min(share['backforward']):.0%}–{max(share['backforward']):.0%} of seeds, SGD in "
            f"{min(share['sgd']):.0%}–{max(share['sgd']):.0%}: "
            + ("robust by the rule above." if robust else "not robust by the rule above."))


def analyse(cfg: ReproduceConfig, arms: list[ToyConfig], trials: list[list[dict]], metrics: dict[str, list[dict]],
            out: Path, source: str) -> str:
    def runs(method: str, lr: float, schedule: str = "constant") -> list[list[dict]]:
        return training_arm(cfg, method, lr, schedule).of(metrics)

    def gap(rs: list[list[dict]]) -> list[float]:
        return [a - b for a, b in zip(final(rs, "train_eval_acc", cfg.epochs), final(rs, "val_acc", cfg.epochs),
                                      strict=True)]

    toy = toy_claims(arms, trials)
    paper: list[Claim] = []
    if 0.1 in cfg.lrs:
        paper.append(compare("lr 0.1: similar results", VAL_ACC, final(runs("sgd", 0.1), "val_acc", cfg.epochs),
                             final(runs("backforward", 0.1), "val_acc", cfg.epochs), SIMILAR))
    for lr in [lr for lr in cfg.lrs if lr != 0.1]:
        sgd, bf = runs("sgd", lr), runs("backforward", lr)
        paper.append(converges_faster(f"lr {lr:g}: Backforward converges faster", sgd, bf, cfg.epochs))
        paper.append(performs_better(f"lr {lr:g}: Backforward performs better", sgd, bf, cfg.epochs))
    regulariser = []
    for lr in cfg.lrs:
        sgd, bf = runs("sgd", lr), runs("backforward", lr)
        regulariser.append(compare(f"lr {lr:g}: larger weight norm without ICS", WEIGHT_NORM,
                                   final(sgd, "weight_norm", cfg.epochs), final(bf, "weight_norm", cfg.epochs), HIGHER))
        regulariser.append(compare(f"lr {lr:g}: ICS regularises: without it (Backforward) the generalisation gap "
                                   "is larger", GAP, gap(sgd), gap(bf), HIGHER))
    bf_decay = runs("backforward", cfg.decay_lr, "cosine")
    decay = [performs_better(f"lr {cfg.decay_lr:g}: a decaying lr helps Backforward (A: constant lr, B: decay)",
                             runs("backforward", cfg.decay_lr), bf_decay, cfg.epochs),
             performs_better(f"lr {cfg.decay_lr:g} with decay: Backforward beats SGD",
                             runs("sgd", cfg.decay_lr, "cosine"), bf_decay, cfg.epochs)]
    claims = decide(toy[:2] + paper + regulariser + decay + toy[2:])

    toy_figure(arms, trials, out / "toy.png")
    panels = [(f"lr {lr:g}", {label: runs(m, lr) for m, label in METHODS}) for lr in cfg.lrs]
    curves_figure(out / "fig1.png", panels, [("train_loss", "training loss", True),
                                             ("val_acc", "validation accuracy", False)])
    curves_figure(out / "weight_norms.png", panels,
                  [("weight_norm", "weight L2 norm", False),
                   (lambda m: m["train_eval_acc"] - m["val_acc"], "generalisation gap (train − val acc)", False)])
    decay_panels = [(f"lr {cfg.decay_lr:g}, {s}", {label: runs(m, cfg.decay_lr, s) for m, label in METHODS})
                    for s in ("constant", "cosine")]
    curves_figure(out / "lr_decay.png", decay_panels, [("train_loss", "training loss", True),
                                                       ("val_acc", "validation accuracy", False)])
    forest_figure(claims, out / "reproduce_effects.png", "Reproducing the paper: effects against minimum effects")

    rows = []
    for lr, schedule in settings(cfg):
        for method, label in METHODS:
            rs = runs(method, lr, schedule)
            stopped = sum(1 for r in rs if len(r) < cfg.epochs)
            rows.append([label, f"{lr:g}", schedule, _ci(final(rs, "val_acc")), _ci(final(rs, "train_loss")),
                         _ci(final(rs, "weight_norm")), _ci(gap(rs)), f"{np.mean(final(rs, 'train_seconds')):.1f}",
                         f"{stopped}/{len(rs)}"])
    all_runs = [r for lr, s in settings(cfg) for m, _ in METHODS for r in runs(m, lr, s)]
    line = diverged_line({f"{label}, lr {lr:g}, {s}": runs(m, lr, s) for lr, s in settings(cfg)
                          for m, label in METHODS}, cfg.epochs)
    diverged = f"\n{line}\n" if line else ""
    summary = "; ".join(c.said() for c in paper + regulariser + decay)
    toy_tables = "\n\n".join(f"```\n{format_toy(summarize_toy(t, c.zero_tol), c)}\n```"
                             for c, t in zip(arms, trials, strict=True))
    form = "quick form (`--quick`)" if cfg == QUICK else "full form" if cfg == ReproduceConfig() else "custom settings"
    return f"""## Reproducing the paper

Written by `backforward reproduce`, {form}. Data: {source}. MLP 784-{cfg.hidden}-10 (ReLU), plain SGD (no
momentum, no weight decay, no augmentation), batch {cfg.batch_size} with `drop_last`, {cfg.epochs} epochs, seeds
0–{cfg.seeds - 1} (a seed fixes initial weights and batch order, shared by both methods); toy experiment:
{cfg.toy.seeds} seeds per arm.
Bands and brackets: 95% confidence intervals. Training took {training_seconds(all_runs) / 60:.1f} process-minutes
(sum over runs).

### Where this rerun deviates from the paper

{deviations(cfg, source)}

### Claims

{claims_table(claims)}

{family_note(claims)}
{diverged}
**Summary (computed from the verdicts above):** {summary}.

![effects](reproduce_effects.png)

### 1. Toy experiment

One step at lr {cfg.toy.lr:g} on a batch of {cfg.toy.batch_size} digits; a seed picks the batch and the initial
weights, shared by both methods. The paper's setting first, then arms that change one setting each. The toy claim
is called *robust* if its first verdict (reaches ≈ 0 more often) holds in every arm and Backforward
reaches ≈ 0 in at least {ROBUST_SHARE:.0%} of seeds in every arm.

**Toy (computed):** {toy_sentence(arms, trials, toy)}

![toy](toy.png)

{toy_tables}

### 2. Figure 1: training loss and validation accuracy

![Figure 1](fig1.png)

{markdown_table(["method", "lr", "schedule", "final val acc", "final train loss", "final weight norm",
                 "generalisation gap", "seconds/run", "stopped early"], rows)}

### 3. Weight norms and the generalisation gap

The paper reads a larger weight norm without ICS as ICS regularising; a regulariser should show
in generalisation, so the gap (accuracy on the training set, evaluated after each epoch, minus
validation accuracy) is tested beside the norm.

![weight norms](weight_norms.png)

### 4. A decaying learning rate at lr {cfg.decay_lr:g} (cosine to 0 over the run)

![lr decay](lr_decay.png)
"""


def deviations(cfg: ReproduceConfig, source: str) -> str:
    rows = [
        ["data", "MNIST (60,000 training, 10,000 test digits)", source,
         "no dataset host is reachable here; `--data-dir` runs full MNIST" if source == EMBEDDED_SOURCE
         else "none: `--data-dir` gave these files"],
        ["input normalisation", "not stated; the authors' configuration: the usual MNIST mean/std",
         f"(x/255 − {MEAN}) / {STD}", "the authors' configuration; the toy experiment adds a raw-pixel arm"],
        ["initialisation", "not stated; the authors' code: PyTorch's default", "PyTorch's default",
         "the same; the depth study adds a declared Kaiming arm"],
        ["epochs and stopping", "up to 1,000 epochs, early stopping on training loss (patience 200): "
         "the authors' configuration", f"{cfg.epochs} epochs, no early stopping",
         "compute budget (the curves show where each run stands at the end)"],
        ["batch", "not stated; the authors' configuration: 128 with `drop_last`", f"{cfg.batch_size} with `drop_last`",
         "the authors' public configuration"],
        ["validation", "every 5 epochs, batch 512 (authors' configuration)", "every epoch, batch 512",
         "per-epoch curves"],
        ["seeds", "one run per curve", f"{cfg.seeds} paired seeds per arm", "confidence intervals and paired tests"],
        ["toy experiment", "one batch, hidden width 256", f"{cfg.toy.seeds} seeds; arms for width, input scale, "
         "initialisation", "one batch cannot tell a rule from luck"],
        ["lr decay", "'decreasing learning rate over time', unspecified", "cosine to 0 over the run, per step",
         "a common schedule"],
    ]
    return markdown_table(["", "paper", "this run", "why"], rows)


def _ci(values: list[float]) -> str:
    return fmt_ci(mean_ci(values))


def toy_figure(arms: list[ToyConfig], trials: list[list[dict]], path: Path) -> None:
    """Per arm: every seed's loss after the step for both methods (log scale), and the share reaching ≈ 0."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    for i, (config, runs) in enumerate(zip(arms, trials, strict=True)):
        for j, (key, label) in enumerate((("sgd", "SGD"), ("backforward", "Backforward"))):
            values = [max(t[key], 1e-8) for t in runs]
            x = i + (j - 0.5) * 0.35 + np.linspace(-0.1, 0.1, len(values))
            left.scatter(x, values, s=5, color=f"C{j}", alpha=0.5, label=label if i == 0 else None)
            left.hlines(np.median(values), i + (j - 0.5) * 0.35 - 0.15, i + (j - 0.5) * 0.35 + 0.15, color="black")
            share = float(np.mean([t[key] < config.zero_tol for t in runs]))
            right.bar(i + (j - 0.5) * 0.35, share, width=0.35, color=f"C{j}", label=label if i == 0 else None)
    labels = [change(c, arms[0]).replace("paper's setting", f"paper's setting\n(width {c.hidden})") for c in arms]
    left.axhline(arms[0].zero_tol, color="grey", linestyle=":")
    left.set_yscale("log")
    left.set_ylabel("loss on the batch after the step")
    left.set_xticks(range(len(arms)), labels, fontsize=7)
    left.legend(fontsize=8)
    left.set_title(f"Toy: one step at lr {arms[0].lr:g}, {arms[0].seeds} seeds per arm (bar: median)", fontsize=9)
    right.axhline(ROBUST_SHARE, color="grey", linestyle=":")
    right.set_xticks(range(len(arms)), labels, fontsize=7)
    right.set_ylabel(f"share of seeds with loss < {arms[0].zero_tol:g}")
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    right.set_title(f"dotted: {ROBUST_SHARE:.0%}, the robustness rule", fontsize=9)
    save_figure(fig, path)
