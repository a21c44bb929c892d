"""The backforward command line: toy, train, reproduce, study, bench, data.

Whatever goes wrong that a user can fix (an argument, a data file, a run folder, a full or
read-only disk) prints one line and exits with status 2; see EXIT_STATUS for the rest.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

REPORT_DIR = "runs/report"  # reproduce and the studies add their sections to one report
BENCH_DIR = "runs/bench"
EXIT_STATUS = """exit status:
  0    done (also: --resume of a run that had already finished)
  1    a worker process was killed from outside (kill -9, out of memory); rerun to resume
  2    bad arguments, data or files, a run folder in use or holding other settings,
       a full or read-only disk: one line says which
  3    a run diverged (its finished epochs are kept)
  130  Ctrl-C, 143 SIGTERM: finished epochs are kept; rerun (train: with --resume) to continue"""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (``backforward train: error: argument --lr: ...``), exit 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default after its help, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and "%(default)" not in text and default is not None and default is not False
                and default != argparse.SUPPRESS
                and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
            text += f" (default: {shown})"
        return text


# ---- argument types: each rejects a bad value at parse time, in one line ----

FLOAT32_MAX = 3.4e38  # the rates and factors become float32 tensors: a larger one overflows in the first step
WIDEST = 65536  # hidden width: a layer this wide already takes 200 MB (784 inputs); wider ones exhaust memory
DEEPEST = 1000  # hidden layers
MOST_THREADS = 1024  # torch starts them all at the first operation
LARGEST_BATCH = 65536  # bench's random batches: 200 MB of MNIST-shaped inputs
LARGEST_SEED = 2 ** 32 - 1  # batch orders are seeded with seed·100003 + epoch, which must fit 64 bits


def number(kind: Callable, accept: Callable[[float], bool], rule: str) -> Callable[[str], object]:
    """An argparse type: ``kind(text)``, finite, that must satisfy ``accept``, else a message stating ``rule``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = f"{rule} {kind.__name__}"
    return parse


def positive(kind: Callable, at_most: float | None = None) -> Callable[[str], object]:
    if at_most is None:
        return number(kind, lambda v: v > 0, "positive")
    return number(kind, lambda v: 0 < v <= at_most, f"positive and at most {at_most:g}")


def non_negative(kind: Callable, at_most: float | None = None) -> Callable[[str], object]:
    if at_most is None:
        return number(kind, lambda v: v >= 0, "0 or more")
    return number(kind, lambda v: 0 <= v <= at_most, f"from 0 to {at_most:g}" if kind is float
                  else f"from 0 to {at_most}")


MOST_WEIGHTS = 2 ** 28  # 1 GiB of float32 weights; a step keeps several copies (gradients, optimizer state, replays)


def too_big(hidden: int, depth: int, hidden_option: str, depth_option: str) -> str | None:
    """Why an MLP of ``depth`` hidden layers ``hidden`` wide is too big to build here, or None if it is not."""
    weights = 784 * hidden + (depth - 1) * hidden * hidden + 10 * hidden
    if weights <= MOST_WEIGHTS:
        return None
    return (f"{hidden_option} {hidden} with {depth_option} {depth} makes {weights:.2g} weights, more than the "
            f"{MOST_WEIGHTS:.2g} this harness builds; choose a smaller {hidden_option} or {depth_option}")


def not_empty(text: str) -> None:
    """An empty path would mean the current folder (Path("") is "."): never what was meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a folder")


def output_folder(text: str) -> str:
    """A folder to write into: it may not exist yet, but it must not be a file."""
    not_empty(text)
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return text


def data_folder(text: str) -> str:
    """A folder of MNIST IDX files (checked file by file when loaded)."""
    not_empty(text)
    if Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is a file; give the folder that holds the four IDX files")
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return text


def run_folder(text: str) -> str:
    """The folder of a finished ``train`` run, to start from its model."""
    not_empty(text)
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder" if not Path(text).exists()
                                         else f"{text} is a file, not a run folder")
    if not (Path(text) / "checkpoint.pt").is_file():
        raise argparse.ArgumentTypeError(f"{text} holds no checkpoint.pt (not a run folder, or a run that "
                                         "never finished an epoch)")
    from .files import CommandError
    from .train import read_status

    try:
        status = read_status(text)
    except CommandError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if status.get("status") != "done":  # its checkpoint is the model of some epoch, not the final one
        raise argparse.ArgumentTypeError(f"{text} holds an unfinished run (status {status.get('status')}, "
                                         f"{status.get('epochs', 0)} epochs done); finish it with --resume first")
    return text


def device(text: str) -> str:
    from .train import usable_device

    try:
        usable_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=data_folder, default=None, metavar="DIR",
                   help="full MNIST: a folder with the four IDX files, plain or .gz (default: the 5,000 "
                        "embedded digits)")


# ---- commands ----

def add_toy(sub) -> None:
    p = command(sub, "toy", "the paper's toy experiment", "one step at lr 1.0 on a batch of 4 digits, SGD vs "
                "Backforward from the same start, over many seeds")
    p.add_argument("--seeds", type=positive(int), default=20, help="seeds (each picks the batch and the weights)")
    p.add_argument("--batch-size", type=positive(int), default=4, help="digits in the batch")
    p.add_argument("--hidden", type=positive(int, WIDEST), default=256, help="hidden width of the MLP")
    p.add_argument("--lr", type=positive(float, FLOAT32_MAX), default=1.0, help="learning rate of the one step")
    p.add_argument("--zero-tol", type=positive(float), default=0.01, help="a loss below this counts as ~0")
    add_data_dir(p)
    p.set_defaults(run=cmd_toy)


def cmd_toy(args: argparse.Namespace) -> int:
    from .data import load
    from .progress import Progress
    from .toy import ToyConfig, format_toy, run_toy, summarize_toy

    config = ToyConfig(seeds=args.seeds, batch_size=args.batch_size, hidden=args.hidden, lr=args.lr,
                       zero_tol=args.zero_tol)
    if problem := too_big(args.hidden, 1, "--hidden", "depth"):
        return fail(problem)
    data = load(args.data_dir)
    if config.batch_size > len(data.y_train):
        return fail(f"batch-size {config.batch_size} exceeds the {len(data.y_train)} training samples")
    with Progress(config.seeds, "toy", unit="seed") as bar:
        trials = run_toy(data, config, bar)
    print(format_toy(summarize_toy(trials, config.zero_tol), config))
    return 0


BENCH_DIR = "runs/bench"


def add_bench(sub) -> None:
    from .bench import MODELS

    p = command(sub, "bench", "step time and memory against two cost models", "SGD, the paper's loop, and the "
                "generic and fast engines on MNIST-shaped random batches, against a measured-cost and a FLOP model; "
                "the met/MISS lines check the targets")
    p.add_argument("--threads", type=positive(int, MOST_THREADS), default=1,
                   help="torch threads (1, so that ratios measure work, not threading)")
    p.add_argument("--steps", type=positive(int), default=20,
                   help="timed steps per method (their median counts; with --device cuda, timed samples of 10 "
                        "steps each)")
    p.add_argument("--warmup", type=non_negative(int), default=3, help="untimed steps first")
    p.add_argument("--depths", type=positive(int, DEEPEST), nargs="+", default=[1, 2, 4, 8],
                   help="hidden layers of the width --width MLPs")
    p.add_argument("--width", type=positive(int, WIDEST), default=512, help="MLP hidden width")
    p.add_argument("--batch-size", type=positive(int, LARGEST_BATCH), default=128,
                   help="batch of the MLPs and the CNN")
    p.add_argument("--models", nargs="+", choices=MODELS, default=None, metavar="MODEL",
                   help=f"which models ({' '.join(MODELS)}); small-mlp: width 64, batch 16, depths 2 4 8; "
                        "resnet, transformer, lstm: batch 32 (default: all; with --device cuda: mlp small-mlp)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the MLPs on the GPU, eager and as whole-step CUDA graphs, host-device syncs counted, "
                        "wall time (figure bench-cuda.png)")
    p.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    p.add_argument("--out", type=output_folder, default=BENCH_DIR, metavar="DIR",
                   help="folder for the figure bench.png (bench-cuda.png with --device cuda)")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    p.add_argument("--profile", action="store_true",
                   help="instead: where a plain SGD step of each model spends CPU time (torch.profiler)")
    p.add_argument("--distributed", action="store_true",
                   help="instead: Backforward vs DDP on 2 gloo processes (all-reduce calls, bytes, time) beside an "
                        "alpha-beta model of their scaling to 1024 processes")
    p.set_defaults(run=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    import torch

    from . import bench_cuda
    from .bench import MODELS, bench_model, default_suite, format_table, plot, records_as_dicts
    from .progress import Progress

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return fail(f"--out {out} is a file, not a folder")
    if problem := too_big(args.width, max(args.depths), "--width", "--depths"):
        return fail(problem)
    torch.set_num_threads(args.threads)
    if args.profile and (args.distributed or args.json):
        return fail(f"--profile prints torch.profiler's tables of plain SGD steps: leave out "
                    f"{'--distributed' if args.distributed else '--json'}")
    on_cuda = args.device == "cuda"
    if on_cuda:
        if args.profile or args.distributed:
            return fail("--device cuda times steps on one GPU: leave out --profile and --distributed")
        if args.models is not None and set(args.models) - set(bench_cuda.FAMILIES):
            return fail(f"--device cuda runs the MLPs only (--models {' '.join(bench_cuda.FAMILIES)})")
        if not torch.cuda.is_available():
            return fail(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device")
    models = args.models or (bench_cuda.FAMILIES if on_cuda else MODELS)
    suite = default_suite(models, args.depths, args.width, args.batch_size)
    if args.distributed:
        from .bench import comm_records, format_comm, scaling

        comm = comm_records(suite, steps=args.steps)
        print(json.dumps([asdict(r) for r in comm], indent=1) if args.json else format_comm(comm, scaling(comm)))
        return 0
    if args.profile:
        from .bench import example_batch, profile_sgd_step

        for entry in suite:
            print(f"{entry.name}: plain SGD step, {args.threads} thread(s)\n"
                  f"{profile_sgd_step(entry.build(), *example_batch(entry))}")
        return 0
    records = []
    with Progress(len(suite) * (args.steps + args.warmup), "bench", unit="round") as bar:
        for entry in suite:
            run = bench_cuda.bench_cuda_model if on_cuda else bench_model
            records += run(entry, args.steps, args.warmup, progress=bar)
    table = (bench_cuda.format_table(records, torch.cuda.get_device_name()) if on_cuda
             else format_table(records, args.threads))
    print(json.dumps(records_as_dicts(records), indent=1) if args.json else table)
    if not args.no_plot:
        figure = out / ("bench-cuda.png" if on_cuda else "bench.png")
        plot(records, str(figure))
        print(f"figure: {figure}", file=sys.stderr)
    return 0


def add_train(sub) -> None:
    from ..optimizer import ORDERS
    from .models import ARCHS, INITS
    from .train import BASES, METHODS, SCHEDULES

    p = command(sub, "train", "one resumable training run", "the run folder --out gets config.json (the settings "
                "and their identity), metrics.jsonl (a line per epoch), checkpoint.pt and status.json; one process "
                "writes into a folder at a time")
    p.add_argument("--method", choices=METHODS, default="sgd", help="the optimizer's step")
    p.add_argument("--lr", type=positive(float, FLOAT32_MAX), default=0.05, help="learning rate")
    p.add_argument("--epochs", type=positive(int), default=30,
                   help="epochs (the one setting --resume may raise, except with --schedule cosine)")
    p.add_argument("--batch-size", type=positive(int), default=128, help="samples per step (the last partial "
                                                                           "batch is dropped)")
    p.add_argument("--hidden", type=positive(int, WIDEST), default=256, help="hidden width")
    p.add_argument("--depth", type=positive(int, DEEPEST), default=1, help="hidden layers")
    p.add_argument("--seed", type=non_negative(int, LARGEST_SEED), default=0,
                   help="fixes the initial weights and batch order")
    p.add_argument("--batchnorm", action="store_true", help="BatchNorm after each hidden Linear")
    p.add_argument("--order", choices=ORDERS, default="forward",
                   help="Backforward's stage order (reverse keeps the shift)")
    p.add_argument("--momentum", type=non_negative(float, FLOAT32_MAX), default=0.0, help="SGD momentum")
    p.add_argument("--weight-decay", type=non_negative(float, FLOAT32_MAX), default=0.0,
                   help="weight decay (L2, added to the gradients) of either --base")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="learning rate schedule (cosine decays to 0 over the run)")
    p.add_argument("--switch-epoch", type=non_negative(int), default=0, metavar="N",
                   help="with --method backforward: Backforward for N epochs, then SGD (0: never switch)")
    p.add_argument("--init-from", type=run_folder, default=None, metavar="DIR",
                   help="start from the final model of this run folder (fine-tuning)")
    p.add_argument("--track-ics", action="store_true", help="log per-layer ICS (mean over steps) per epoch")
    p.add_argument("--ics-every", type=positive(int), default=1, metavar="K",
                   help="with --track-ics: measure every K-th step")
    p.add_argument("--arch", choices=ARCHS, default="mlp",
                   help="mlp, linear (no activations), resmlp (--depth residual blocks) or cnn")
    p.add_argument("--init", choices=INITS, default="default", help="initial weights: PyTorch's default, kaiming "
                                                                     "or orthogonal")
    p.add_argument("--base", choices=BASES, default="sgd",
                   help="base optimizer: sgd (with --momentum) or adam; --weight-decay applies to either")
    p.add_argument("--eval-train", action="store_true", help="evaluate the training set after each epoch too")
    add_data_dir(p)
    p.add_argument("--device", type=device, default="cpu", help="torch device (cuda needs a CUDA build and a GPU)")
    p.add_argument("--out", type=output_folder, required=True, metavar="DIR", help="the run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same settings; --epochs may grow, "
                        "except with --schedule cosine)")
    p.set_defaults(run=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .launch import exit_without_shutdown, launched_by_torchrun
    from .train import TrainConfig

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    try:
        config.validate()
    except ValueError as e:
        return fail(str(e))
    if problem := too_big(args.hidden, args.depth, "--hidden", "--depth"):
        return fail(problem)
    if problem := ignored_options(args):
        return fail(problem)
    distributed = launched_by_torchrun()
    code = _train(config, args, distributed)
    if distributed:
        exit_without_shutdown(code)
    return code


def ignored_options(args: argparse.Namespace) -> str | None:
    """Why options given to ``train`` would have no effect, or None: a run must be what its settings say."""
    from .train import TrainConfig

    default = TrainConfig()
    fixed = {"cnn": ("hidden", "depth", "batchnorm"), "resmlp": ("batchnorm",)}.get(args.arch, ())
    given = [f"--{name}" for name in fixed if getattr(args, name) != getattr(default, name)]
    if given:
        what = "a fixed network" if args.arch == "cnn" else "no BatchNorm"
        return f"--arch {args.arch} does not use {' or '.join(given)} ({what}): it would change nothing; leave it out"
    if args.base == "adam" and args.momentum != default.momentum:
        return "--base adam does not use --momentum (it keeps its own moment estimates); leave it out"
    return None


def _train(config, args: argparse.Namespace, distributed: bool) -> int:
    from . import launch
    from .files import CommandError
    from .train import EXIT_DIVERGED, Diverged, holds_run, read_status, train

    try:
        with launch.process_group(config.device) if distributed else nullcontext():
            train(config, args.out, resume=args.resume)
    except (CommandError, ValueError) as e:
        return fail(f"{e}{_failed(e, config)}")
    except Diverged as e:
        print(f"backforward: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except launch.INTERRUPTS as e:
        if not holds_run(args.out):  # stopped before the run's first file: nothing to resume
            print(f"backforward: {stopped(e)} before the run started", file=sys.stderr)
            return launch.exit_code(e)
        try:
            done = f"after {read_status(args.out).get('epochs', 0)} of {config.epochs} epochs"
        except CommandError:
            done = "(status.json unreadable)"
        print(f"backforward: {stopped(e)} {done}; run the same command with --resume to continue", file=sys.stderr)
        return launch.exit_code(e)
    except RuntimeError as e:
        if not distributed:
            if out_of_memory(e):
                return fail(f"out of memory ({_first_line(e)}){_failed(e, config)}")
            raise
        # A collective failed: another process died or timed out. Say so in one line, not a traceback.
        return fail(f"rank {os.environ.get('RANK')}: lost the other processes ({_first_line(e)}); "
                    "see the failing rank's own message")
    return 0


def _failed(e: BaseException, config) -> str:
    """How to continue a run that ``e`` stopped after it started (``train`` marked it failed), else ""."""
    if getattr(e, "failed_after", None) is None:
        return ""
    return (f"; the run is marked failed after {e.failed_after} of {config.epochs} epochs: fix that, then run the "
            "same command with --resume to continue")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def add_data(sub) -> None:
    p = command(sub, "data", "full MNIST", "download the four IDX files, or check a folder of them")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="{download,check}", help="what to do")
    d = command(verbs, "download", "fetch the four gzipped IDX files", "checksummed and written atomically; files "
                "already there with the right checksum are kept")
    d.add_argument("--to", type=output_folder, required=True, metavar="DIR", help="folder to write into")
    d.add_argument("--mirror", default=None, metavar="URL",
                   help="base URL holding the four .gz files (default: the PyTorch team's S3 mirror)")
    d.set_defaults(run=cmd_data_download)
    c = command(verbs, "check", "parse a folder of IDX files and print what it holds")
    c.add_argument("data_dir", type=data_folder, metavar="DIR", help="the folder to check")
    c.set_defaults(run=cmd_data_check)


def cmd_data_download(args: argparse.Namespace) -> int:
    from .data import MNIST_MIRROR, download

    for path in download(args.to, args.mirror or MNIST_MIRROR):
        print(path)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data import load_idx_dir

    split = load_idx_dir(args.data_dir)
    print(f"{split.source}: {len(split.y_train)} training and {len(split.y_val)} validation digits")
    return 0


def add_experiment_options(p: argparse.ArgumentParser, quick_help: str) -> None:
    """Options shared by the commands that run many training runs into one report."""
    from .sweep import default_jobs

    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=output_folder, default=REPORT_DIR, metavar="DIR",
                   help="output folder: REPORT.md, figures, and runs/ (one folder per run, reused only by the "
                        "same settings)")
    add_data_dir(p)
    p.add_argument("--jobs", type=positive(int), default=default_jobs(),
                   help="runs in parallel, each on one torch thread, so that results do not depend on it "
                        "(default: %(default)s, this machine's cores)")
    p.set_defaults(after_interrupt="run the same command again to continue (finished runs are kept)")


def add_reproduce(sub) -> None:
    p = command(sub, "reproduce", "the paper's experiments", "toy, Figure 1, weight norms and a decaying lr, "
                "several seeds each, and a claims table with computed verdicts, in --out's REPORT.md")
    add_experiment_options(p, "fewer seeds and epochs (under 3 minutes on 2 cores)")
    p.set_defaults(run=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .files import folder_lock
    from .reproduce import reproduce

    with folder_lock(args.out):
        report = reproduce(Path(args.out), quick=args.quick, jobs=args.jobs, data_dir=args.data_dir)
    print(report.read_text())
    print(f"report: {report}", file=sys.stderr)
    return 0


def add_study(sub) -> None:
    from .studies import STUDIES

    p = command(sub, "study", "the paper's open questions", "each study adds its section to the same report: "
                + ", ".join(STUDIES) + ", or all of them")
    p.add_argument("name", choices=[*STUDIES, "all"], help="which study")
    add_experiment_options(p, "fewer seeds, epochs and settings (minutes each)")
    p.set_defaults(run=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    from .files import folder_lock
    from .studies import STUDIES, run_study

    names = list(STUDIES) if args.name == "all" else [args.name]
    with folder_lock(args.out):
        for name in names:
            report = run_study(name, Path(args.out), quick=args.quick, jobs=args.jobs, data_dir=args.data_dir)
            print((Path(args.out) / "sections" / f"{name}.md").read_text())
    print(f"report: {report}", file=sys.stderr)
    return 0


# ---- the parser and the way out ----

def command(sub, name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
    """A subcommand: ``summary`` in the list of commands, then ``description`` on its own --help."""
    text = textwrap.fill(f"{summary}{': ' + description if description else ''}.", 100)
    return sub.add_parser(name, help=summary, description=text, formatter_class=HelpFormatter, epilog=EXIT_STATUS)


def fail(message: str) -> int:
    print(f"backforward: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is torch (or Python) failing to allocate memory."""
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def stopped(interrupt: BaseException) -> str:
    from .launch import Terminated

    return "stopped by SIGTERM" if isinstance(interrupt, Terminated) else "interrupted"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("backforward")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="backforward", formatter_class=HelpFormatter, epilog=EXIT_STATUS,
                    description=textwrap.fill("Backforward Propagation (Stoica & Simionescu, AAAI 2023): the "
                                              "paper's experiments, its open questions, the benchmark, and single "
                                              "training runs.", 100))
    parser.add_argument("--version", action="version", version=f"backforward {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of")
    add_toy(sub)
    add_train(sub)
    add_reproduce(sub)
    add_study(sub)
    add_bench(sub)
    add_data(sub)
    return parser


EXTRA = ("numpy", "scipy", "matplotlib", "tqdm", "mlxtend")  # backforward[experiments]


def missing_extra() -> list[str]:
    """The experiment harness's packages that are not installed."""
    import importlib.util

    return [name for name in EXTRA if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_extra()
    if missing:
        return fail(f"the command line needs the experiments extra: pip install 'backforward[experiments]' "
                    f"(missing: {', '.join(missing)})")
    from . import launch
    from .files import CommandError
    from .sweep import WorkerDied

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad argument (one line said which): its status
        return e.code if isinstance(e.code, int) else 0
    with launch.sigterm_raises():
        try:
            return args.run(args)
        except CommandError as e:
            return fail(str(e))
        except OSError as e:  # a file fault the code did not foresee: still one line, naming the file
            return fail(f"{e.filename}: {e.strerror}" if e.filename else str(e))
        except (MemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            return fail(f"out of memory ({_first_line(e)}); choose a smaller model or batch")
        except WorkerDied as e:
            print(f"backforward: error: {e}", file=sys.stderr)
            return 1
        except launch.INTERRUPTS as e:
            hint = getattr(args, "after_interrupt", "")
            print(f"backforward: {stopped(e)}{'; ' + hint if hint else ''}", file=sys.stderr)
            return launch.exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
