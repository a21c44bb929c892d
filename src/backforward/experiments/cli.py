"""The ``backforward`` command line: toy, train, reproduce, study, bench, data download.

Errors a user can fix (bad arguments, bad data files) print one line and exit with
status 2; a diverged training run exits with status 3.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext

REPORT_DIR = "runs/report"  # reproduce and the studies add their sections to one report


def number(kind: Callable, accept: Callable[[float], bool], rule: str) -> Callable[[str], object]:
    """An argparse type: ``kind(text)`` that must satisfy ``accept``, else a message stating ``rule``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = f"{rule} {kind.__name__}"
    return parse


def positive(kind: Callable) -> Callable[[str], object]:
    return number(kind, lambda v: v > 0, "positive")


non_negative_int = number(int, lambda v: v >= 0, "0 or more")


def add_toy(sub) -> None:
    p = sub.add_parser("toy", help="the paper's toy experiment: one step at lr 1.0 on 4 digits, many seeds")
    p.add_argument("--seeds", type=positive(int), default=20)
    p.add_argument("--batch-size", type=positive(int), default=4)
    p.add_argument("--hidden", type=positive(int), default=256)
    p.add_argument("--lr", type=positive(float), default=1.0)
    p.add_argument("--zero-tol", type=positive(float), default=0.01, help="a loss below this counts as ~0")
    p.add_argument("--data-dir", default=None, help="full MNIST IDX files (default: the embedded digits)")
    p.set_defaults(run=cmd_toy)


def cmd_toy(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import load
    from .toy import ToyConfig, format_toy, run_toy, summarize_toy

    config = ToyConfig(seeds=args.seeds, batch_size=args.batch_size, hidden=args.hidden, lr=args.lr,
                       zero_tol=args.zero_tol)
    data = load(args.data_dir)
    with tqdm(total=config.seeds, desc="toy", unit="seed", disable=not sys.stderr.isatty()) as bar:
        trials = run_toy(data, config, bar)
    print(format_toy(summarize_toy(trials, config.zero_tol), config))
    return 0


BENCH_DIR = "runs/bench"


def add_bench(sub) -> None:
    from .bench import MODELS

    p = sub.add_parser("bench", help="step time and memory: sgd, the paper's loop, generic and fast engines, "
                                     "against a measured-cost and a FLOP model")
    p.add_argument("--threads", type=positive(int), default=1,
                   help="torch threads (default 1, so ratios measure work, not threading)")
    p.add_argument("--steps", type=positive(int), default=20, help="timed steps per method (median; default 20)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--depths", type=positive(int), nargs="+", default=[1, 2, 4, 8],
                   help="hidden layers of the width --width MLPs (default 1 2 4 8)")
    p.add_argument("--width", type=positive(int), default=512, help="MLP width (default 512)")
    p.add_argument("--batch-size", type=positive(int), default=128, help="batch of the MLPs and the CNN (default 128)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), metavar="MODEL",
                   help=f"which models (default all: {' '.join(MODELS)}); small-mlp: width 64, batch 16, "
                        "depths 2 4 8; resnet, transformer, lstm: batch 32")
    p.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    p.add_argument("--out", default=BENCH_DIR, help=f"folder for the figure (default {BENCH_DIR})")
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
    from tqdm import tqdm

    from .bench import bench_model, default_suite, format_table, plot, records_as_dicts, variants

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return fail(f"--out {out} is a file, not a folder")
    torch.set_num_threads(args.threads)
    suite = default_suite(args.models, args.depths, args.width, args.batch_size)
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
    rounds = len(suite) * (args.steps + args.warmup)
    with tqdm(total=rounds, desc="bench", unit="round", disable=not sys.stderr.isatty()) as bar:
        for entry in suite:
            if not sys.stderr.isatty():
                print(f"bench: {entry.name} ({len(variants(entry))} variants)", file=sys.stderr)
            records += bench_model(entry, args.steps, args.warmup, progress=bar)
    print(json.dumps(records_as_dicts(records), indent=1) if args.json else format_table(records, args.threads))
    figure = out / "bench.png"
    plot(records, str(figure))
    print(f"figure: {figure}", file=sys.stderr)
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="one resumable training run; metrics.jsonl and checkpoints in --out")
    p.add_argument("--method", default="sgd", help="sgd or backforward")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=1, help="hidden layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batchnorm", action="store_true", help="BatchNorm after each hidden Linear")
    p.add_argument("--order", default="forward", help="Backforward stage order: forward or reverse")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="constant", help="constant or cosine (decays to 0)")
    p.add_argument("--switch-epoch", type=int, default=0, help="Backforward for N epochs, then SGD")
    p.add_argument("--init-from", default=None, help="start from the final model of this run directory")
    p.add_argument("--track-ics", action="store_true", help="log per-layer ICS (mean over steps) per epoch")
    p.add_argument("--data-dir", default=None, help="full MNIST IDX files (default: the embedded digits)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
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
    distributed = launched_by_torchrun()
    code = _train(config, args, distributed)
    if distributed:
        exit_without_shutdown(code)
    return code


def _train(config, args: argparse.Namespace, distributed: bool) -> int:
    from .launch import process_group
    from .train import EXIT_DIVERGED, ConfigMismatch, Diverged, train

    try:
        with process_group(config.device) if distributed else nullcontext():
            train(config, args.out, resume=args.resume)
    except (ConfigMismatch, ValueError) as e:
        return fail(str(e))
    except Diverged as e:
        print(f"backforward: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except RuntimeError as e:
        if not distributed:
            raise
        # A collective failed: another process died or timed out. Say so in one line, not a traceback.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return fail(f"rank {os.environ.get('RANK')}: lost the other processes ({first}); "
                    "see the failing rank's own message")
    return 0


def add_data(sub) -> None:
    p = sub.add_parser("data", help="full MNIST: download the IDX files, or check a directory")
    verbs = p.add_subparsers(dest="verb", required=True)
    d = verbs.add_parser("download", help="fetch the four IDX files (checksummed, written atomically)")
    d.add_argument("--to", required=True, help="directory to write into")
    d.add_argument("--mirror", default=None, help="base URL holding the four .gz files")
    d.set_defaults(run=cmd_data_download)
    c = verbs.add_parser("check", help="parse a directory of IDX files and print what it holds")
    c.add_argument("data_dir")
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
    p.add_argument("--out", default=REPORT_DIR, help="output directory (REPORT.md, figures, runs/)")
    p.add_argument("--data-dir", default=None, help="full MNIST IDX files (default: the embedded digits)")
    p.add_argument("--jobs", type=positive(int), default=default_jobs(), help="runs in parallel (default: cores)")


def add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's experiments, several seeds, figures and a claims report")
    add_experiment_options(p, "fewer seeds and epochs (under 3 minutes on 2 cores)")
    p.set_defaults(run=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .reproduce import reproduce

    report = reproduce(Path(args.out), quick=args.quick, jobs=args.jobs, data_dir=args.data_dir)
    print(report.read_text())
    print(f"report: {report}", file=sys.stderr)
    return 0


def add_study(sub) -> None:
    from .studies import STUDIES

    p = sub.add_parser("study", help="the paper's open questions: " + ", ".join(STUDIES) + ", or all")
    p.add_argument("name", choices=[*STUDIES, "all"])
    add_experiment_options(p, "fewer seeds, epochs and settings (minutes each)")
    p.set_defaults(run=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .studies import STUDIES, run_study

    names = list(STUDIES) if args.name == "all" else [args.name]
    for name in names:
        report = run_study(name, Path(args.out), quick=args.quick, jobs=args.jobs, data_dir=args.data_dir)
        print((Path(args.out) / "sections" / f"{name}.md").read_text())
    print(f"report: {report}", file=sys.stderr)
    return 0


def fail(message: str) -> int:
    print(f"backforward: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backforward", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_toy(sub)
    add_bench(sub)
    add_train(sub)
    add_data(sub)
    add_reproduce(sub)
    add_study(sub)
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
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except DataError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("backforward: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
