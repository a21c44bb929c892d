"""The paper's toy experiment: one step at lr 1.0 on a batch of 4 digits; is the batch learned?

The paper's claim: with a wide enough hidden layer (256 is "enough"), Backforward drives
the batch loss to ≈ 0 in one step, while plain SGD does not. We run it over many seeds (a
seed picks the batch and the initial weights, shared by both methods, so the methods are
compared pair by pair) and in arms that change one setting of the paper's at a time:
input scale, hidden width, initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ..optimizer import Backforward
from .data import MEAN, STD, Split
from .models import initialise, mlp

METHODS = ("sgd", "backforward")
INPUTS = ("normalised", "raw")  # the usual MNIST normalisation, or raw pixels in [0, 1]


@dataclass(frozen=True)
class ToyConfig:
    seeds: int = 100
    batch_size: int = 4
    hidden: int = 256
    lr: float = 1.0
    zero_tol: float = 0.01  # a loss below this counts as "learned the batch"
    inputs: str = "normalised"
    init: str = "default"

    @property
    def label(self) -> str:
        return f"width {self.hidden}, {self.inputs} inputs, {self.init} init"


PAPER = ToyConfig()


def change(arm: ToyConfig, base: ToyConfig) -> str:
    """What ``arm`` changes from ``base``, in a few words ("width 64", "raw inputs"); "paper's setting" if nothing."""
    changes = [f"width {arm.hidden}" if arm.hidden != base.hidden else "",
               f"{arm.inputs} inputs" if arm.inputs != base.inputs else "",
               f"{arm.init} init" if arm.init != base.init else ""]
    return ", ".join(c for c in changes if c) or "paper's setting"


def toy_arms(base: ToyConfig = PAPER) -> list[ToyConfig]:
    """The paper's setting first, then one change at a time: width 64 and 1024, raw pixels, Kaiming init."""
    return [base, replace(base, hidden=64), replace(base, hidden=1024), replace(base, inputs="raw"),
            replace(base, init="kaiming")]


def toy_trial(data: Split, config: ToyConfig, seed: int) -> dict[str, float]:
    """One seed: the batch loss before the step and after it, for each method from the same start."""
    if config.inputs not in INPUTS:
        raise ValueError(f"unknown inputs {config.inputs!r} (choose from {', '.join(INPUTS)})")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.y_train), generator=generator)[: config.batch_size]
    x, y = data.x_train[idx], data.y_train[idx]
    if config.inputs == "raw":
        x = x * STD + MEAN  # undo the normalisation: pixels back in [0, 1]
    torch.manual_seed(seed)
    start = initialise(mlp(1, config.hidden), config.init)
    loss_fn = nn.functional.cross_entropy
    with torch.no_grad():
        result = {"seed": seed, "before": float(loss_fn(start(x), y))}
    for method in METHODS:
        model = mlp(1, config.hidden)
        model.load_state_dict(start.state_dict())
        base = torch.optim.SGD(model.parameters(), lr=config.lr)
        if method == "sgd":
            loss_fn(model(x), y).backward()
            base.step()
        else:
            try:
                Backforward(model, base).step_batch(x, y, loss_fn)
            except FloatingPointError:  # a pass's loss became non-finite (the step was undone): it diverged
                result[method] = math.inf
                continue
        with torch.no_grad():
            loss = float(loss_fn(model(x), y))
        result[method] = loss if math.isfinite(loss) else math.inf  # diverged: NaN would compare as neither
    return result


def run_toy(data: Split, config: ToyConfig, progress=None) -> list[dict[str, float]]:
    trials = []
    for seed in range(config.seeds):
        trials.append(toy_trial(data, config, seed))
        if progress is not None:
            progress.update(1)
    return trials


def summarize_toy(trials: list[dict[str, float]], zero_tol: float) -> dict[str, dict[str, float]]:
    """Per method (and the loss before): median, quartiles, max, and the share of seeds below zero_tol."""
    summary = {}
    for key in ("before", *METHODS):
        v = np.array([t[key] for t in trials])
        summary[key] = {"median": float(np.median(v)), "q25": float(np.quantile(v, 0.25)),
                        "q75": float(np.quantile(v, 0.75)), "max": float(v.max()),
                        "reached_zero": float(np.mean(v < zero_tol))}
    summary["both"] = {"backforward_lower": float(np.mean([t["backforward"] < t["sgd"] for t in trials]))}
    return summary


def format_toy(summary: dict[str, dict[str, float]], config: ToyConfig) -> str:
    head = (f"Toy experiment: batch of {config.batch_size} digits, MLP 784-{config.hidden}-10 ({config.inputs} "
            f"inputs, {config.init} init), one step at lr {config.lr}, {config.seeds} seeds\n")
    rows = [f"{'loss on the batch':<22}{'median':>10}{'q25':>10}{'q75':>10}{'max':>10}"
            f"{'< ' + format(config.zero_tol, 'g'):>12}"]
    for key, label in (("before", "before the step"), ("sgd", "after SGD"), ("backforward", "after Backforward")):
        s = summary[key]
        rows.append(f"{label:<22}{s['median']:>10.4g}{s['q25']:>10.4g}{s['q75']:>10.4g}{s['max']:>10.4g}"
                    f"{s['reached_zero']:>12.0%}")
    rows.append(f"Backforward's loss is lower than SGD's in {summary['both']['backforward_lower']:.0%} of seeds")
    return head + "\n".join(rows)
