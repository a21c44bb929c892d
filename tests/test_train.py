"""Training runs: metrics, resume after kill -9 bit for bit, divergence, bad arguments."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from backforward.experiments.cli import main
from backforward.experiments.train import TrainConfig, read_metrics, read_status, train

TIMINGS = ("seconds", "train_seconds")

CLI = [sys.executable, "-m", "backforward.experiments"]


def without_timings(metrics):
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics]


def test_metrics_lines_have_every_field(tmp_path):
    metrics = train(TrainConfig(method="backforward", epochs=2, hidden=32), tmp_path / "run", progress=False)
    lines = read_metrics(tmp_path / "run")
    assert lines == metrics and [m["epoch"] for m in lines] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "weight_norm", "layer_norms", "seconds", "flops"):
        assert key in lines[0]
    assert set(lines[0]["layer_norms"]) == {"0", "2"}
    total = sum(v ** 2 for v in lines[0]["layer_norms"].values()) ** 0.5
    assert lines[0]["weight_norm"] == pytest.approx(total)
    assert read_status(tmp_path / "run")["status"] == "done"


def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path):
    args = ["--method", "sgd", "--epochs", "6", "--hidden", "64", "--track-ics", "--seed", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = tmp_path / "whole"
    subprocess.run([*CLI, "train", *args, "--out", str(whole)], env=env, check=True,
                   capture_output=True)
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([*CLI, "train", *args, "--out", str(crashed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(read_metrics(crashed)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # somewhere in epoch 3 (or later): mid-epoch most of the time
    proc.wait()
    done_before = len(read_metrics(crashed))
    assert 2 <= done_before < 6, "the run should have been killed part way"
    result = subprocess.run([*CLI, "train", *args, "--out", str(crashed), "--resume"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert without_timings(read_metrics(crashed)) == without_timings(read_metrics(whole))
    assert [m["epoch"] for m in read_metrics(crashed)] == list(range(1, 7))


def test_resume_restores_metrics_lost_between_checkpoint_and_metrics_write(tmp_path):
    config = TrainConfig(method="backforward", epochs=3, hidden=32)
    whole = train(config, tmp_path / "whole", progress=False)
    run = tmp_path / "run"
    train(TrainConfig(method="backforward", epochs=2, hidden=32), run, progress=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")  # as if killed after the checkpoint, before metrics
    train(config, run, resume=True, progress=False)
    assert without_timings(read_metrics(run)) == without_timings(whole)


def test_resume_refuses_a_different_run(tmp_path, capsys):
    train(TrainConfig(epochs=1, hidden=16), tmp_path / "run", progress=False)
    assert main(["train", "--epochs", "2", "--hidden", "32", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "other settings (hidden)" in capsys.readouterr().err


def test_divergence_stops_cleanly_with_status_and_exit_3(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "backforward", "--lr", "1e8", "--epochs", "3", "--out", str(out)]) == 3
    status = read_status(out)
    assert status["status"] == "diverged" and status["step"] >= 1 and "non-finite loss" in status["message"]
    assert "diverged in epoch 1" in capsys.readouterr().err
    assert read_metrics(out) == []


@pytest.mark.parametrize("bad, message", [
    (["--lr", "-0.1"], "lr must be positive"),
    (["--batch-size", "0"], "batch-size must be positive"),
    (["--method", "adam"], "unknown method 'adam'"),
    (["--epochs", "0"], "epochs must be positive"),
    (["--order", "sideways"], "unknown order"),
    (["--batch-size", "5000"], "exceeds the 4000 training samples"),
])
def test_invalid_arguments_exit_2_with_a_message(tmp_path, capsys, bad, message):
    assert main(["train", *bad, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_switch_epoch_and_cosine_schedule(tmp_path):
    metrics = train(TrainConfig(method="backforward", epochs=3, hidden=16, switch_epoch=2, schedule="cosine"),
                    tmp_path / "run", progress=False)
    assert [m["method"] for m in metrics] == ["backforward", "backforward", "sgd"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["schedule"] == "cosine" and config["switch_epoch"] == 2
