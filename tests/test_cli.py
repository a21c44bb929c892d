"""The command line as a careful user meets it: one-line errors, help that answers, progress, no litter."""

import argparse
import re

import pytest
import torch

from backforward.experiments.cli import build_parser, main
from backforward.experiments.train import TrainConfig, train


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A file, an empty folder, a finished 16-wide run, a run whose checkpoint is damaged, and an interrupted run."""
    root = tmp_path_factory.mktemp("paths")
    (root / "file").write_text("not a folder\n")
    (root / "empty").mkdir()
    train(TrainConfig(epochs=1, hidden=16), root / "run16", progress=False)
    train(TrainConfig(epochs=1, hidden=16), root / "damaged", progress=False)
    train(TrainConfig(epochs=1, hidden=16), root / "unfinished", progress=False)
    (root / "unfinished" / "status.json").write_text('{"status": "interrupted", "epochs": 1}\n')
    (root / "damaged" / "checkpoint.pt").write_bytes(b"\x00" * 64)
    return root


TRAIN = ["train", "--hidden", "16", "--epochs", "1", "--out", "{tmp}/run"]
BAD = [  # (arguments, what the one line must say); {paths} and {tmp} are filled in
    ([], "the following arguments are required: COMMAND"),
    (["fly"], "invalid choice: 'fly'"),
    (["toy", "--seeds", "0"], "argument --seeds: must be positive, got 0"),
    (["toy", "--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["toy", "--lr", "1e300"], "argument --lr: must be positive and at most 3.4e+38, got 1e300"),
    (["toy", "--hidden", "100000000"], "argument --hidden: must be positive and at most 65536, got 100000000"),
    (["bench", "--width", "100000000"], "argument --width: must be positive and at most 65536"),
    (["bench", "--threads", "2147483648"], "argument --threads: must be positive and at most 1024, got 2147483648"),
    (["bench", "--batch-size", "100000000"], "argument --batch-size: must be positive and at most 65536"),
    (["bench", "--width", "65536", "--depths", "1", "1000"],
     "--width 65536 with --depths 1000 makes 4.3e+12 weights, more than the 2.7e+08 this harness builds"),
    (["toy", "--zero-tol", "-1"], "must be positive"),
    (["toy", "--batch-size", "5000"], "batch-size 5000 exceeds the 4000 training samples"),
    (["toy", "--data-dir", "{paths}/file"], "file is a file; give the folder that holds the four IDX files"),
    (["toy", "--hidden", "wide"], "argument --hidden: expected a whole number, got 'wide'"),
    (["bench", "--threads", "0"], "argument --threads: must be positive"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be 0 or more"),
    (["bench", "--depths", "1", "0"], "argument --depths: must be positive and at most 1000, got 0"),
    (["bench", "--out", "{paths}/file"], "file is a file, not a folder"),
    (["bench", "--plot", "x.png"], "unrecognized arguments: --plot x.png"),
    ([*TRAIN[:-2]], "the following arguments are required: --out"),
    ([*TRAIN, "--method", "adam"], "argument --method: invalid choice: 'adam' (choose from 'sgd', 'backforward')"),
    ([*TRAIN, "--order", "sideways"], "argument --order: invalid choice: 'sideways'"),
    ([*TRAIN, "--schedule", "step"], "argument --schedule: invalid choice: 'step'"),
    ([*TRAIN, "--lr", "-0.1"], "argument --lr: must be positive and at most 3.4e+38, got -0.1"),
    ([*TRAIN, "--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    ([*TRAIN, "--lr", "1e39"], "argument --lr: must be positive and at most 3.4e+38, got 1e39"),
    ([*TRAIN, "--momentum", "1e39"], "argument --momentum: must be from 0 to 3.4e+38, got 1e39"),
    ([*TRAIN, "--hidden", "100000000"], "argument --hidden: must be positive and at most 65536"),
    ([*TRAIN, "--depth", "1001"], "argument --depth: must be positive and at most 1000, got 1001"),
    ([*TRAIN, "--hidden", "20000", "--depth", "2"], "--hidden 20000 with --depth 2 makes 4.2e+08 weights"),
    ([*TRAIN, "--seed", "922337203685477"], "argument --seed: must be from 0 to 4294967295, got 922337203685477"),
    ([*TRAIN, "--epochs", "1.5"], "argument --epochs: expected a whole number, got '1.5'"),
    ([*TRAIN, "--batch-size", "0"], "argument --batch-size: must be positive"),
    ([*TRAIN, "--batch-size", "5000"], "batch-size 5000 exceeds the 4000 training samples"),
    ([*TRAIN, "--depth", "0"], "argument --depth: must be positive"),
    ([*TRAIN, "--seed", "-1"], "argument --seed: must be from 0 to 4294967295, got -1"),
    ([*TRAIN, "--momentum", "-0.9"], "argument --momentum: must be from 0 to 3.4e+38, got -0.9"),
    ([*TRAIN, "--weight-decay", "x"], "argument --weight-decay: expected a number, got 'x'"),
    ([*TRAIN, "--switch-epoch", "2"], "switch-epoch needs method backforward"),
    ([*TRAIN, "--device", "bogus"], "argument --device: device 'bogus' is not usable here"),
    ([*TRAIN, "--device", "cuda:99"], "argument --device: device 'cuda:99' is not usable here"),
    ([*TRAIN, "--device", "meta"], "argument --device: device 'meta' is not usable here"),
    ([*TRAIN, "--data-dir", "{paths}/file"], "file is a file; give the folder that holds the four IDX files"),
    ([*TRAIN, "--data-dir", "{paths}/missing"], "missing: no such folder"),
    ([*TRAIN, "--data-dir", "{paths}/empty"], "train-images-idx3-ubyte: missing"),
    ([*TRAIN, "--init-from", "{paths}/missing"], "argument --init-from: {paths}/missing: no such folder"),
    ([*TRAIN, "--init-from", "{paths}/file"], "file is a file, not a run folder"),
    ([*TRAIN, "--init-from", "{paths}/empty"], "empty holds no checkpoint.pt"),
    ([*TRAIN, "--init-from", "{paths}/damaged"], "damaged/checkpoint.pt: unreadable checkpoint"),
    ([*TRAIN, "--init-from", "{paths}/unfinished"], "argument --init-from: {paths}/unfinished holds an unfinished "
     "run (status interrupted, 1 epochs done); finish it with --resume first"),
    ([*TRAIN[:-2], "--hidden", "32", "--init-from", "{paths}/run16", "--out", "{tmp}/r"],
     "run16/checkpoint.pt: its model does not fit this run's (size mismatch for 0.weight"),
    ([*TRAIN[:-2], "--out", "{paths}/file"], "argument --out: {paths}/file is a file, not a folder"),
    ([*TRAIN[:-2], "--out", ""], "argument --out: an empty path; name a folder"),
    ([*TRAIN, "--arch", "cnn", "--batchnorm", "--depth", "3"],
     "--arch cnn does not use --hidden or --depth or --batchnorm (a fixed network): it would change nothing; leave "
     "it out"),
    (["train", "--arch", "cnn", "--hidden", "32", "--out", "{tmp}/run"], "--arch cnn does not use --hidden (a fixed"),
    ([*TRAIN, "--arch", "resmlp", "--batchnorm"], "--arch resmlp does not use --batchnorm (no BatchNorm)"),
    ([*TRAIN, "--base", "adam", "--momentum", "0.9"], "--base adam does not use --momentum (it keeps its own moment "
     "estimates); leave it out"),
    (["bench", "--profile", "--json"], "--profile prints torch.profiler's tables of plain SGD steps: leave out --json"),
    (["bench", "--profile", "--distributed"], "--profile prints torch.profiler's tables of plain SGD steps: leave out "
     "--distributed"),
    ([*TRAIN, "--data-dir", " "], "argument --data-dir: an empty path; name a folder"),
    ([*TRAIN, "--init-from", ""], "argument --init-from: an empty path; name a folder"),
    (["reproduce", "--out", ""], "argument --out: an empty path; name a folder"),
    (["bench", "--out", ""], "argument --out: an empty path; name a folder"),
    (["data", "download", "--to", ""], "argument --to: an empty path; name a folder"),
    ([*TRAIN[:-2], "--out", "{paths}/run16"], "run16: already holds a run (1 epochs done); pass --resume"),
    ([*TRAIN, "--resume"], "run: no run to resume (no such folder)"),
    ([*TRAIN[:-2], "--out", "{paths}/empty", "--resume"], "empty: holds no run to resume"),
    (["data"], "the following arguments are required: {{download,check}}"),
    (["data", "check", "{paths}/file"], "file is a file; give the folder"),
    (["data", "check", "{paths}/missing"], "missing: no such folder"),
    (["data", "check", "{paths}/empty"], "train-images-idx3-ubyte: missing"),
    (["data", "download", "--to", "{paths}/file"], "argument --to: {paths}/file is a file, not a folder"),
    (["data", "download", "--to", "{tmp}/mnist", "--mirror", "nowhere"], "download failed (unknown url type"),
    (["reproduce", "--out", "{paths}/file"], "argument --out: {paths}/file is a file, not a folder"),
    (["reproduce", "--jobs", "0"], "argument --jobs: must be positive"),
    (["reproduce", "--data-dir", "{paths}/file"], "file is a file; give the folder"),
    (["study", "colour"], "argument name: invalid choice: 'colour'"),
    (["study", "order", "--out", "{paths}/file"], "is a file, not a folder"),
    (["study", "order", "--data-dir", "{paths}/missing"], "missing: no such folder"),
]


@pytest.mark.parametrize("args, says", BAD, ids=[" ".join(a) or "(nothing)" for a, _ in BAD])
def test_every_bad_argument_is_one_line_and_exit_2(paths, tmp_path, capsys, args, says):
    if args[-2:] == ["--device", "cuda:99"] and torch.cuda.device_count() > 99:
        pytest.skip("this machine has a cuda:99")
    fill = {"paths": str(paths), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("backforward"), err
    assert says.format(**fill) in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_device_cuda_on_a_cpu_build_is_one_line(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("backforward train: error: argument --device: device 'cuda' is not usable "
                                       f"here: this torch ({torch.__version__}) was built without CUDA\n")


def subcommands(parser=None, prefix="backforward"):
    """(prog, parser) of every command and subcommand."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from subcommands(sub, f"{prefix} {name}")


def test_every_option_has_help_and_shows_its_default_and_choices():
    for prog, parser in subcommands():
        text = parser.format_help()
        assert "``" not in text and ":func:" not in text, prog
        assert parser.description and not parser.description.startswith(" "), prog
        for action in parser._actions:
            assert action.help, f"{prog} {action.option_strings or action.dest}: no help"
            default = action.default
            if action.option_strings and default not in (None, False, argparse.SUPPRESS) and action.dest != "help":
                shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
                assert f"(default: {shown}" in " ".join(text.split()), f"{prog} {action.option_strings[0]}"
    train_help = " ".join(dict(subcommands())["backforward train"].format_help().split())
    for expected in ("--method {sgd,backforward}", "--order {forward,reverse}", "--schedule {constant,cosine}",
                     "learning rate (default: 0.05)", "(default: 30)", "--seed SEED fixes the initial weights and "
                     "batch order (default: 0)"):
        assert expected in train_help, expected


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"backforward {version('backforward')}\n"


def test_help_lists_the_exit_statuses(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  2 +bad arguments", out, re.M) and "143 SIGTERM" in out


# ---- progress off a terminal ----

def test_progress_line_by_hand(monkeypatch):
    from backforward.experiments.progress import Progress

    bar = Progress(10, "study depth", initial=2)
    bar.done = 4  # 2 runs in 20 s here: 10 s each, 6 left
    assert bar.line(20.0) == "study depth: 4/10 runs, 0:20 elapsed, ~1:00 left"
    bar.done = 10
    assert bar.line(3725.0) == "study depth: 10/10 runs, 1:02:05 elapsed, done"
    assert Progress(3, "toy", unit="seed").line(0.0) == "toy: 0/3 seeds, 0:00 elapsed, ? left"


def test_toy_and_bench_print_progress_lines_off_a_terminal(tmp_path, capsys):
    assert main(["toy", "--seeds", "2", "--hidden", "16"]) == 0
    assert "toy: 2/2 seeds, " in capsys.readouterr().err
    assert main(["bench", "--steps", "2", "--warmup", "1", "--models", "mlp", "--depths", "1", "--width", "8",
                 "--batch-size", "4", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("bench: 1/3 rounds, ") and lines[-2].startswith("bench: 3/3 rounds, ")


def test_sweeps_print_progress_lines_off_a_terminal(tmp_path, capsys):
    from backforward.experiments.sweep import Run, run_all

    run_all([Run(f"r{s}", TrainConfig(epochs=1, hidden=8, seed=s)) for s in range(2)], tmp_path, jobs=1,
            desc="study order")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("study order: 1/2 runs, ") and lines[-1].startswith("study order: 2/2 runs, ")
    assert lines[-1].endswith(" elapsed, done")


# ---- files ----

def test_bench_writes_its_figure_under_runs_not_into_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--steps", "1", "--warmup", "0", "--models", "mlp", "--depths", "1", "--width", "8",
                 "--batch-size", "4"]) == 0
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()] == ["runs/bench/bench.png"]
    assert "figure: runs/bench/bench.png" in capsys.readouterr().err

