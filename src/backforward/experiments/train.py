"""The training loop: one resumable run of SGD or Backforward on MNIST, written to a folder.

The run folder holds ``config.json`` (every setting and the identity hashed from them),
``metrics.jsonl`` (one line per epoch), ``checkpoint.pt`` (model, optimizer, RNG states, the
metrics so far) and ``status.json`` (running, interrupted, failed, diverged or done), each rewritten
atomically after every epoch, and ``.lock``: one process writes into a folder at a time.

``resume=True`` continues from the last checkpoint and ends with the same metrics as an
uninterrupted run, bit for bit on CPU, timings aside. It checks what it cannot take on
trust: the checkpoint must load, the settings must be the run's own (only ``epochs`` may
grow, and not under a cosine schedule), and metrics it would not reproduce are never
overwritten. Ctrl-C and SIGTERM stop a run after marking it interrupted; the epochs
finished so far are kept.

Under ``torchrun`` each rank trains on its shard of every global batch (same global
order as one process); gradients are averaged per pass; only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..ics import measure_ics
from ..optimizer import ORDERS, Backforward
from ..replay import rng_restore, rng_snapshot
from . import launch
from .cost import predicted_units, stage_flops
from .data import Split, load
from .files import (
    CommandError,
    absolute_path,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    folder_lock,
    read_json,
    read_jsonl,
)
from .models import ARCHS, INITS, build, weight_norms

METHODS = ("sgd", "backforward")
SCHEDULES = ("constant", "cosine")
BASES = ("sgd", "adam")  # the base optimizer Backforward (or the plain step) uses
EXTENDABLE = ("epochs",)  # the one setting a resume may change: train a finished run for longer
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
    init_from: str | None = None    # fine-tuning: start from this run folder's final model
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
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                problems.append(f"{name.replace('_', '-')} must be 0 or more, got {value}")
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

    def canonical(self) -> dict:
        """Every setting, each as its declared type (lr 1 and 1.0 are one setting): what a run is."""
        settings = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and type(f.default) in (bool, int, float):
                value = type(f.default)(value)
            settings[f.name] = value
        return settings

    def identity(self) -> str:
        """A hash of the canonical settings: equal for two configs exactly when they define the same run."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def differences(self, asked: TrainConfig, allowed: tuple[str, ...] = ()) -> list[str]:
        """This saved run's settings that differ from those ``asked``, ``allowed`` aside ("lr 0.05, asked 0.1")."""
        ours, theirs = self.canonical(), asked.canonical()
        return [f"{k} {ours[k]}, asked {theirs[k]}" for k in ours if k not in allowed and ours[k] != theirs[k]]

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def read_config(path: Path) -> TrainConfig:
    """The settings a run folder's ``config.json`` holds; one line if it holds something else."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CommandError(f"{path}: not a run's settings (a JSON object expected, found {type(data).__name__})")
    return TrainConfig.from_dict(data)


class Diverged(Exception):
    """The loss became non-finite; the run stops with status ``diverged``."""


class ConfigMismatch(CommandError):
    """The folder holds another run, or the run's settings do not allow what was asked."""


def usable_device(name: str) -> torch.device:
    """``name`` as a torch device this machine can compute on; ``ValueError`` in one line otherwise."""
    try:
        device = torch.device(name)
        if device.type == "meta":
            raise ValueError("a meta tensor holds no data to train")
        if device.type == "cuda":  # checked without touching a GPU: under torchrun each rank has its own
            if not torch.cuda.is_available():
                raise ValueError(f"this torch ({torch.__version__}) was built without CUDA" if torch.version.cuda
                                 is None else "no CUDA GPU is visible")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"only {torch.cuda.device_count()} CUDA GPU(s) are visible")
        else:
            torch.empty(1, device=device)
    except Exception as e:  # RuntimeError for unknown names and devices this torch lacks
        raise ValueError(f"device {name!r} is not usable here: {_first_line(e)}") from None
    return device


def _first_line(e: BaseException) -> str:
    """An exception's message, short: its first line, and of a long line its first sentence."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". ")[0] if len(line) > 200 else line


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
    """Run (or, with ``resume=True``, continue) one training run; returns the metrics of every epoch.

    Raises ``Diverged`` after recording the status if the loss becomes non-finite, and
    ``CommandError`` (one line) for a folder that cannot serve as asked. Ctrl-C and SIGTERM
    mark the run interrupted and propagate.
    """
    config.validate()
    config = replace(config, data_dir=absolute_path(config.data_dir), init_from=absolute_path(config.init_from))
    out = Path(out)
    rank, world = launch.rank_and_world()
    writer = rank == 0
    if config.batch_size % world:
        raise ValueError(f"batch-size {config.batch_size} is not divisible by {world} processes")
    device = usable_device(config.device)
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out}: is a file, not a run folder")
    if resume and not out.is_dir():
        raise CommandError(f"{out}: no run to resume (no such folder); check the path, or leave out --resume "
                           "to start one")
    if resume and (done := finished_metrics(out, config)) is not None:
        if progress and writer:
            print(f"{out}: already finished ({len(done)}/{config.epochs} epochs); nothing to do", file=sys.stderr)
        return done
    init_state = _load_checkpoint(Path(config.init_from) / "checkpoint.pt", device) if config.init_from else None
    data = data if data is not None else load(config.data_dir)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_val, y_val = data.x_val.to(device), data.y_val.to(device)
    steps_per_epoch = len(y_train) // config.batch_size  # drop_last, as the authors did
    if steps_per_epoch == 0:
        raise ValueError(f"batch-size {config.batch_size} exceeds the {len(y_train)} training samples")

    torch.manual_seed(config.seed)
    model = build_model(config).to(device)  # the same initial weights on every rank
    if world > 1 and rank > 0:
        torch.manual_seed(config.seed + 7919 * rank)  # other dropout masks on other ranks, as in plain DDP
    if init_state is not None:
        _load_into(model, init_state["model"], Path(config.init_from) / "checkpoint.pt")
    base = build_base(config, model.parameters())
    backforward = Backforward(model, base, order=config.order, track_ics=config.track_ics)
    with folder_lock(out) if writer else nullcontext():
        metrics, written = _prepare(out, config, resume, model, base, rank, device)
        launch.barrier()  # every rank has read the folder before rank 0 writes into it
        if writer:
            atomic_write_json(out / "config.json", {**config.canonical(), "identity": config.identity()})
            if written != _lines(metrics) or not (out / "metrics.jsonl").exists():  # new, or an epoch lost
                # between a checkpoint and its metrics line: the checkpoint holds it
                atomic_write_text(out / "metrics.jsonl", "".join(_lines(metrics)))
            _write_status(out, "running", epochs=len(metrics))
        try:
            _epochs(config, out, model, base, backforward, metrics, (x_train, y_train, x_val, y_val), steps_per_epoch,
                    progress)
        except launch.INTERRUPTS:
            if writer:
                _write_status(out, "interrupted", epochs=len(metrics))
            raise
        except Diverged:
            raise  # its status, with the step, is written
        except Exception as e:  # a full disk, memory, a bug: not left "running", which no process is
            if writer:
                _mark_failed(out, len(metrics), e)
            raise
        if writer:
            _write_status(out, "done", epochs=len(metrics))
    return metrics


def _epochs(config: TrainConfig, out: Path, model: nn.Module, base: torch.optim.Optimizer, backforward: Backforward,
            metrics: list[dict], tensors: tuple[torch.Tensor, ...], steps_per_epoch: int, progress: bool) -> None:
    """Train the epochs after those in ``metrics``, appending each epoch's record and saving after it."""
    x_train, y_train, x_val, y_val = tensors
    device = x_train.device
    rank, world = launch.rank_and_world()
    writer = rank == 0
    total_steps = config.epochs * steps_per_epoch
    flops = predicted_units(stage_flops(model, x_train[: config.batch_size // world]))
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
        try:
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
        finally:  # cleared however the epoch ends: what is printed next (its line, or why it stopped)
            if bar is not None:  # starts a line of its own
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
        rng_states = launch.gather_objects(rng_snapshot())  # every rank's, so each resumes its own stream
        with launch.interrupts_deferred():  # an epoch counts once it is saved, and is saved whole
            if writer:
                _save(out, config, model, base, [*metrics, record], rng_states)
            metrics.append(record)  # only now: a save that failed leaves the epochs saved, which status.json names
        if progress and writer:  # on a terminal too: the bar is gone, and this is what the epoch gave
            print(f"epoch {epoch}/{config.epochs}  train_loss {record['train_loss']:.4f}  "
                  f"val_acc {val_acc:.4f}  ({seconds:.1f}s)", file=sys.stderr)


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
    atomic_torch_save({"config": config.canonical(), "model": model.state_dict(), "optimizer": base.state_dict(),
                       "rng": rng_states, "metrics": metrics}, out / "checkpoint.pt")
    atomic_write_text(out / "metrics.jsonl", "".join(_lines(metrics)))
    _write_status(out, "running", epochs=len(metrics))


RUN_FILES = ("config.json", "checkpoint.pt", "metrics.jsonl", "status.json")
CHECKPOINT_KEYS = {"config", "model", "optimizer", "rng", "metrics"}


def holds_run(out: str | Path) -> bool:
    """Whether ``out`` holds (part of) a run: something to resume, or to refuse to overwrite."""
    return any((Path(out) / name).exists() for name in RUN_FILES)


def finished_metrics(out: str | Path, config: TrainConfig) -> list[dict] | None:
    """The metrics of ``out`` if it holds exactly this run, finished (a resume then has nothing to do)."""
    out = Path(out)
    status = read_status(out)
    if status["status"] != "done" or status.get("epochs") != config.epochs or not (out / "config.json").exists():
        return None
    if read_config(out / "config.json").identity() != config.identity():
        return None
    metrics = read_metrics(out)
    return metrics if len(metrics) == config.epochs else None


def _prepare(out: Path, config: TrainConfig, resume: bool, model: nn.Module, base: torch.optim.Optimizer,
             rank: int, device: torch.device) -> tuple[list[dict], list[str]]:
    """Check the folder against what was asked and, on resume, load its checkpoint into model and optimizer.

    Returns the metrics so far and the lines ``metrics.jsonl`` holds now.
    """
    config_path, checkpoint, metrics_path = out / "config.json", out / "checkpoint.pt", out / "metrics.jsonl"
    written = _lines(read_jsonl(metrics_path)) if metrics_path.exists() else []
    if not resume:
        if holds_run(out):
            raise ConfigMismatch(f"{out}: already holds a run ({len(written)} epochs done); pass --resume to "
                                 "continue it, or choose another --out")
        return [], written
    if not holds_run(out):
        raise CommandError(f"{out}: holds no run to resume; check the path, or leave out --resume to start one")
    if config_path.exists():
        _check_settings(read_config(config_path), config, config_path)
    if not checkpoint.exists():
        if written:
            raise CommandError(f"{checkpoint}: missing, though {metrics_path.name} holds {len(written)} epochs; "
                               "resuming would train them again over the old metrics (move the folder away to "
                               "start over)")
        return [], written  # stopped before its first epoch ended: nothing to continue
    state = _load_checkpoint(checkpoint, device)
    _check_settings(TrainConfig.from_dict(state["config"]), config, checkpoint)
    metrics = state["metrics"]
    if len(metrics) > config.epochs:
        raise ConfigMismatch(f"{out}: already ran {len(metrics)} epochs, more than --epochs {config.epochs}")
    if written != _lines(metrics)[:len(written)]:
        raise CommandError(f"{metrics_path}: its {len(written)} epochs are not the {len(metrics)} in "
                           f"{checkpoint.name}; not overwriting metrics this run would not reproduce")
    _load_into(model, state["model"], checkpoint)
    try:
        base.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CommandError(f"{checkpoint}: its optimizer state does not fit this run ({_first_line(e)})") from None
    if rank < len(state["rng"]):  # resumed on more processes than saved it: the new ranks keep their seeds
        cpu, cuda = state["rng"][rank]
        rng_restore((cpu, cuda if torch.cuda.is_available() else None))
    return metrics, written


def _check_settings(saved: TrainConfig, config: TrainConfig, source: Path) -> None:
    differ = saved.differences(config, allowed=EXTENDABLE)
    if differ:
        raise ConfigMismatch(f"{source.parent}: holds a run with other settings ({'; '.join(differ)}); resume "
                             "with the run's own settings (only --epochs may change), or choose another --out")
    if saved.schedule == "cosine" and saved.epochs != config.epochs:
        # The rate at every step depends on the run's length: the epochs done followed the old one, so the
        # result would be no run of either length, though config.json would name the longer one.
        raise ConfigMismatch(f"{source.parent}: a cosine schedule decays over the run's {saved.epochs} epochs, so "
                             f"it cannot become a {config.epochs}-epoch run; resume with --epochs {saved.epochs}, "
                             f"or train a new run with --epochs {config.epochs} into another --out")


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint written by ``train``, loaded on ``device``; one line if it is missing or unreadable."""
    if not path.is_file():
        raise CommandError(f"{path}: missing" if path.parent.is_dir() else f"{path.parent}: no such folder")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
        raise CommandError(f"{path}: unreadable checkpoint ({_first_line(e)})") from None
    if not (isinstance(state, dict) and state.keys() >= CHECKPOINT_KEYS):
        raise CommandError(f"{path}: not a checkpoint written by backforward train")
    return state


def _load_into(model: nn.Module, state: dict, source: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()  # "Error(s) in loading state_dict for ...:", then the first problem
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CommandError(f"{source}: its model does not fit this run's ({detail})") from None


def _lines(metrics: list[dict]) -> list[str]:
    return [json.dumps(m) + "\n" for m in metrics]


def _write_status(out: Path, status: str, **details: object) -> None:
    atomic_write_json(out / "status.json", {"status": status, **details})


def _mark_failed(out: Path, epochs: int, e: Exception) -> None:
    """Record in ``status.json`` that the run stopped on ``e``, and on ``e`` (``failed_after``) after how many
    epochs, for the command line to say how to continue."""
    e.failed_after = epochs
    with suppress(CommandError):  # the disk that failed may refuse this too; the message says what went wrong
        _write_status(out, "failed", epochs=epochs, message=_first_line(e))


def _diverged(out: Path, writer: bool, epoch: int, step: int, message: str) -> Diverged:
    text = f"diverged in epoch {epoch}, step {step + 1}: {message}"
    if writer:
        _write_status(out, "diverged", epoch=epoch, step=step + 1, message=message)
    return Diverged(text)


def read_status(out: str | Path) -> dict:
    path = Path(out) / "status.json"
    return read_json(path) if path.exists() else {"status": "new"}


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []
