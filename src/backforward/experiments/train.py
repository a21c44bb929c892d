"""The training loop: one resumable run of SGD or Backforward on MNIST, written to a directory.

``OUT/metrics.jsonl`` gets one line per epoch; ``OUT/checkpoint.pt`` (model, optimizer,
RNG states, the metrics so far) and ``OUT/status.json`` are rewritten atomically after
every epoch. An interrupted run resumed with ``resume=True`` continues from the last
checkpoint and ends with the same metrics, bit for bit on CPU, timings aside.

Under ``torchrun`` each rank trains on its shard of every global batch (same global
order as one process); gradients are averaged per pass; only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..engines import rng_restore, rng_snapshot
from ..ics import measure_ics
from ..optimizer import ORDERS, Backforward
from . import launch
from .cost import predicted_units, stage_flops
from .data import Split, load
from .files import atomic_torch_save, atomic_write_text
from .models import ARCHS, INITS, build, weight_norms

METHODS = ("sgd", "backforward")
SCHEDULES = ("constant", "cosine")
BASES = ("sgd", "adam")  # the base optimizer Backforward (or the plain step) uses
EXIT_DIVERGED = 3


@dataclass
class TrainConfig:
    """Everything that defines a run; two runs with equal configs produce equal metrics."""

    method: str = "sgd"
    lr: float = 0.05
    epochs: int = 30
    batch_size: int = 128
    hidden: int = 256
    depth: int = 1
    seed: int = 0
    batchnorm: bool = False
    order: str = "forward"          # Backforward's stage order
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"      # "cosine": lr decays to 0 over the epochs, per step
    switch_epoch: int = 0           # > 0: Backforward for this many epochs, then SGD (warm-up)
    init_from: str | None = None    # fine-tuning: start from this run directory's final model
    track_ics: bool = False
    arch: str = "mlp"               # mlp, linear (no activations), resmlp (depth = residual blocks), cnn
    init: str = "default"           # default (PyTorch's), kaiming, orthogonal: see models.initialise
    base: str = "sgd"               # base optimizer: sgd (with momentum, weight_decay) or adam
    ics_every: int = 1              # with track_ics: measure on every k-th step of an epoch
    eval_train: bool = False        # also evaluate the training set after each epoch (generalisation gap)
    data_dir: str | None = None
    device: str = "cpu"

    def validate(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        for name in ("lr", "epochs", "batch_size", "hidden", "depth", "ics_every"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                problems.append(f"{name.replace('_', '-')} must be positive, got {value}")
        for name in ("momentum", "weight_decay", "switch_epoch", "seed"):
            if getattr(self, name) < 0:
                problems.append(f"{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.order not in ORDERS:
            problems.append(f"unknown order {self.order!r} (choose from {', '.join(ORDERS)})")
        if self.schedule not in SCHEDULES:
            problems.append(f"unknown schedule {self.schedule!r} (choose from {', '.join(SCHEDULES)})")
        for name, allowed in (("arch", ARCHS), ("init", INITS), ("base", BASES)):
            if getattr(self, name) not in allowed:
                problems.append(f"unknown {name} {getattr(self, name)!r} (choose from {', '.join(allowed)})")
        if self.switch_epoch and self.method != "backforward":
            problems.append("switch-epoch needs method backforward")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class Diverged(Exception):
    """The loss became non-finite; the run stops with status ``diverged``."""


class ConfigMismatch(Exception):
    """--resume was asked for a directory that holds a different run."""


def build_model(config: TrainConfig) -> nn.Sequential:
    return build(config.arch, config.depth, config.hidden, batchnorm=config.batchnorm, init=config.init)


def build_base(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.base == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


class FirstPassOutputs:
    """A loss function that also keeps the outputs of its first call in each step (for accuracy)."""

    def __init__(self) -> None:
        self.outputs: torch.Tensor | None = None

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.outputs is None:
            self.outputs = outputs.detach()
        return nn.functional.cross_entropy(outputs, targets)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> tuple[float, float]:
    """Mean loss and accuracy, model in eval mode (BatchNorm uses running statistics)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = model(x[i:i + batch])
            total_loss += float(nn.functional.cross_entropy(out, y[i:i + batch], reduction="sum"))
            correct += int((out.argmax(1) == y[i:i + batch]).sum())
    model.train(was_training)
    return total_loss / len(y), correct / len(y)


def train(config: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
          data: Split | None = None) -> list[dict]:
    """Run (or resume) one training run; returns the metrics of every epoch.

    Raises ``Diverged`` after recording the status if the loss becomes non-finite.
    """
    config.validate()
    out = Path(out)
    rank, world = launch.rank_and_world()
    writer = rank == 0
    if config.batch_size % world:
        raise ValueError(f"batch-size {config.batch_size} is not divisible by {world} processes")
    device = torch.device(config.device)
    data = data if data is not None else load(config.data_dir)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_val, y_val = data.x_val.to(device), data.y_val.to(device)
    steps_per_epoch = len(y_train) // config.batch_size  # drop_last, as the authors did
    if steps_per_epoch == 0:
        raise ValueError(f"batch-size {config.batch_size} exceeds the {len(y_train)} training samples")

    if not resume and (out / "checkpoint.pt").exists():  # every rank checks, so none waits for the others
        raise ConfigMismatch(f"{out} already holds a run; pass --resume to continue it")
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)  # the same initial weights on every rank
    if world > 1 and rank > 0:
        torch.manual_seed(config.seed + 7919 * rank)  # other dropout masks on other ranks, as in plain DDP
    if config.init_from:
        model.load_state_dict(torch.load(Path(config.init_from) / "checkpoint.pt", map_location=device,
                                         weights_only=True)["model"])
    base = build_base(config, model.parameters())
    backforward = Backforward(model, base, order=config.order, track_ics=config.track_ics)
    total_steps = config.epochs * steps_per_epoch
    flops = predicted_units(stage_flops(model, x_train[: config.batch_size // world]))
    metrics: list[dict] = []
    if resume and (out / "checkpoint.pt").exists():
        metrics = _restore(out / "checkpoint.pt", config, model, base, rank)
    elif writer:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(asdict(config), indent=1) + "\n")
    if writer:
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    average = distributed.grad_averager(None)
    loss_fn = FirstPassOutputs()
    cumulative_flops = metrics[-1]["flops"] if metrics else 0.0
    cumulative_seconds = metrics[-1]["train_seconds"] if metrics else 0.0

    for epoch in range(len(metrics) + 1, config.epochs + 1):
        use_backforward = config.method == "backforward" and (not config.switch_epoch
                                                              or epoch <= config.switch_epoch)
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss·n, correct, n over this rank's samples
        ics: dict[str, list[list[float]]] = {}
        metering = 0.0  # seconds spent measuring ICS on SGD steps: not part of the training cost
        started = time.perf_counter()
        bar = _bar(steps_per_epoch, f"epoch {epoch}/{config.epochs}", progress and writer)
        for step in range(steps_per_epoch):
            if config.schedule == "cosine":
                t = ((epoch - 1) * steps_per_epoch + step) / total_steps
                for group in base.param_groups:
                    group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * t))
            batch = order[step * config.batch_size:(step + 1) * config.batch_size][rank::world].to(device)
            xb, yb = x_train[batch], y_train[batch]
            loss_fn.outputs = None
            metered = config.track_ics and step % config.ics_every == 0
            if metered and not use_backforward:
                meter_start = time.perf_counter()
                _collect(ics, _plain_ics(model, xb, yb, base.param_groups[0]["lr"]))
                metering += time.perf_counter() - meter_start
            try:
                loss = _train_step(model, base, backforward, use_backforward, xb, yb, loss_fn, average)
            except FloatingPointError as e:
                raise _diverged(out, writer, epoch, step, str(e)) from None
            if not math.isfinite(float(loss)):
                raise _diverged(out, writer, epoch, step, f"non-finite loss {float(loss)}")
            if metered and use_backforward:
                _collect(ics, backforward.last_report)
            n = len(yb)
            sums += torch.tensor([float(loss) * n, float((loss_fn.outputs.argmax(1) == yb).sum()), n],
                                 dtype=torch.float64)
            cumulative_flops += (flops["fast"] if use_backforward else flops["sgd"]) * world
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(sums[0] / sums[2]):.4f}")
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - started - metering
        cumulative_seconds += seconds
        sums = launch.sum_over_ranks(sums)
        val_loss, val_acc = evaluate(model, x_val, y_val)
        norms = weight_norms(model)
        record = {"epoch": epoch, "train_loss": float(sums[0] / sums[2]), "train_acc": float(sums[1] / sums[2]),
                  "val_loss": val_loss, "val_acc": val_acc, "weight_norm": norms.pop("total"),
                  "layer_norms": norms, "method": "backforward" if use_backforward else "sgd",
                  "flops": cumulative_flops, "seconds": seconds, "train_seconds": cumulative_seconds}
        if config.eval_train:
            record["train_eval_loss"], record["train_eval_acc"] = evaluate(model, x_train, y_train)
        if ics:
            record["ics"] = {name: {"grad_shift": _mean(v[0]), "grad_cosine": _mean(v[1]), "grad_norm": _mean(v[2]),
                                    "rel_shift": _mean(v[3])} for name, v in ics.items()}
        metrics.append(record)
        rng_states = launch.gather_objects(rng_snapshot())  # every rank's, so each resumes its own stream
        if writer:
            _save(out, config, model, base, metrics, rng_states)
        if progress and writer and not sys.stderr.isatty():
            print(f"epoch {epoch}/{config.epochs}  train_loss {record['train_loss']:.4f}  "
                  f"val_acc {val_acc:.4f}  ({seconds:.1f}s)", file=sys.stderr)
    if writer:
        atomic_write_text(out / "status.json", json.dumps({"status": "done", "epochs": len(metrics)}) + "\n")
    return metrics


def _train_step(model, base, backforward, use_backforward, xb, yb, loss_fn, average) -> torch.Tensor:
    if use_backforward:
        return backforward.step_batch(xb, yb, loss_fn)
    base.zero_grad()
    loss = loss_fn(model(xb), yb)
    loss.backward()
    loss = loss.detach().reshape(1).clone()
    if average is not None:  # the loss rides along: every rank sees the same loss and stops alike
        average([p.grad for p in model.parameters() if p.grad is not None] + [loss])
    loss = loss[0]
    if math.isfinite(float(loss)):
        base.step()
    return loss


def _plain_ics(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, lr: float):
    """ICS along the SGD trajectory at this step (Santurkar et al.)."""
    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    return measure_ics(model, closure, lr)


def _collect(ics: dict[str, list[list[float]]], report) -> None:
    """Per stage: ‖G − G'‖, cos∠(G, G'), ‖G‖ and the scale-free ‖G − G'‖/‖G‖ of one step."""
    for name, shift, cosine, norm in zip(report.stage_names, report.grad_shift, report.grad_cosine,
                                         report.grad_norm, strict=True):
        entry = ics.setdefault(name, [[], [], [], []])
        for values, value in zip(entry, (shift, cosine, norm, shift / norm if norm > 0 else math.nan), strict=True):
            values.append(value)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _bar(total: int, desc: str, enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


def _save(out: Path, config: TrainConfig, model: nn.Module, base: torch.optim.Optimizer, metrics: list[dict],
          rng_states: list[tuple]) -> None:
    """Checkpoint first, then the metrics it holds: a crash between the two loses nothing on resume."""
    atomic_torch_save({"config": asdict(config), "model": model.state_dict(), "optimizer": base.state_dict(),
                       "rng": rng_states, "metrics": metrics}, out / "checkpoint.pt")
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    atomic_write_text(out / "status.json", json.dumps({"status": "running", "epochs": len(metrics)}) + "\n")


def _restore(path: Path, config: TrainConfig, model: nn.Module, base: torch.optim.Optimizer,
             rank: int) -> list[dict]:
    state = torch.load(path, map_location=config.device, weights_only=True)
    saved = TrainConfig.from_dict(state["config"])
    differ = [f.name for f in fields(TrainConfig)
              if f.name != "epochs" and getattr(saved, f.name) != getattr(config, f.name)]
    if differ:
        raise ConfigMismatch(f"{path.parent} holds a run with other settings ({', '.join(differ)}); "
                             "use another --out or the same arguments")
    model.load_state_dict(state["model"])
    base.load_state_dict(state["optimizer"])
    if rank < len(state["rng"]):  # resumed on more processes than saved it: the new ranks keep their seeds
        cpu, cuda = state["rng"][rank]
        rng_restore((cpu, cuda if torch.cuda.is_available() else None))
    if len(state["metrics"]) > config.epochs:
        raise ConfigMismatch(f"{path.parent} already ran {len(state['metrics'])} epochs, "
                             f"more than --epochs {config.epochs}")
    return state["metrics"]


def _diverged(out: Path, writer: bool, epoch: int, step: int, message: str) -> Diverged:
    text = f"diverged in epoch {epoch}, step {step + 1}: {message}"
    if writer:
        atomic_write_text(out / "status.json", json.dumps({"status": "diverged", "epoch": epoch, "step": step + 1,
                                                           "message": message}) + "\n")
    return Diverged(text)


def read_status(out: str | Path) -> dict:
    path = Path(out) / "status.json"
    return json.loads(path.read_text()) if path.exists() else {"status": "new"}


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
