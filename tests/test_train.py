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
    assert "other settings (hidden 16, asked 32)" in capsys.readouterr().err


def test_divergence_stops_cleanly_with_status_and_exit_3(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "backforward", "--lr", "1e8", "--epochs", "3", "--out", str(out)]) == 3
    status = read_status(out)
    assert status["status"] == "diverged" and status["step"] >= 1 and "non-finite loss" in status["message"]
    assert "diverged in epoch 1" in capsys.readouterr().err
    assert read_metrics(out) == []


def test_switch_epoch_and_cosine_schedule(tmp_path):
    metrics = train(TrainConfig(method="backforward", epochs=3, hidden=16, switch_epoch=2, schedule="cosine"),
                    tmp_path / "run", progress=False)
    assert [m["method"] for m in metrics] == ["backforward", "backforward", "sgd"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["schedule"] == "cosine" and config["switch_epoch"] == 2


# ---- one writer, honest resume, clean stops (issues 12 and 13) ----

TINY = ["--hidden", "16", "--seed", "1"]


def start_train(out, *args, epochs=200):
    """A ``backforward train`` process, returned once it has finished its first epoch."""
    # Ctrl-C as at a terminal: a suite started in the background (`cmd &`) has SIGINT ignored, and the child
    # would inherit that.
    proc = subprocess.Popen([*CLI, "train", *TINY, "--epochs", str(epochs), *args, "--out", str(out)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not read_metrics(out):
        assert proc.poll() is None and time.time() < deadline, "the run should be training"
        time.sleep(0.05)
    return proc


def test_a_second_writer_exits_2_naming_the_process_that_holds_the_run(tmp_path, capsys):
    first = start_train(tmp_path / "run")
    try:
        assert main(["train", *TINY, "--epochs", "200", "--out", str(tmp_path / "run"), "--resume"]) == 2
    finally:
        first.kill()
        first.wait()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"in use by process {first.pid}" in err
    # The kernel dropped the killed writer's lock: the run resumes.
    assert main(["train", *TINY, "--epochs", str(len(read_metrics(tmp_path / "run")) + 1),
                 "--out", str(tmp_path / "run"), "--resume"]) == 0


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "stopped by SIGTERM"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_ctrl_c_keep_the_epochs_mark_the_run_and_say_how_to_resume(tmp_path, sig, code, said):
    run = tmp_path / "run"
    proc = start_train(run)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    done = len(read_metrics(run))
    assert err.strip().splitlines()[-1] == (f"backforward: {said} after {done} of 200 epochs; "
                                            "run the same command with --resume to continue")
    assert "Traceback" not in err
    assert read_status(run) == {"status": "interrupted", "epochs": done}
    assert main(["train", *TINY, "--epochs", str(done + 1), "--out", str(run), "--resume"]) == 0
    assert [m["epoch"] for m in read_metrics(run)] == list(range(1, done + 2))


def snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_resume_of_a_finished_run_says_so_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(run)]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--out", str(run), "--resume"]) == 0
    assert capsys.readouterr().err == f"{run}: already finished (2/2 epochs); nothing to do\n"
    assert snapshot(run) == before


def test_resume_of_a_folder_that_does_not_exist_exits_2_and_creates_nothing(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "typo"), "--resume"]) == 2
    assert "typo: no run to resume (no such folder)" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


@pytest.fixture
def two_epochs(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(epochs=2, hidden=16, seed=1), run, progress=False)
    return run


def resume_fails(run, capsys, *extra, epochs=3):
    """Resume ``run`` to ``epochs``; it must exit 2 with one line and leave metrics.jsonl as it was."""
    metrics = (run / "metrics.jsonl").read_bytes()
    assert main(["train", *TINY, "--epochs", str(epochs), *extra, "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert (run / "metrics.jsonl").read_bytes() == metrics
    return err


def test_resume_without_the_checkpoint_never_overwrites_the_metrics(two_epochs, capsys):
    (two_epochs / "checkpoint.pt").unlink()
    assert "checkpoint.pt: missing, though metrics.jsonl holds 2 epochs" in resume_fails(two_epochs, capsys)
    assert "other settings (lr 0.05, asked 0.1)" in resume_fails(two_epochs, capsys, "--lr", "0.1")


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"", lambda b: b"not a zip file"])
def test_resume_from_a_damaged_checkpoint_is_one_line_naming_it(two_epochs, capsys, damage):
    checkpoint = two_epochs / "checkpoint.pt"
    checkpoint.write_bytes(damage(checkpoint.read_bytes()))
    assert f"{checkpoint}: unreadable checkpoint (" in resume_fails(two_epochs, capsys)


def test_resume_never_overwrites_metrics_it_did_not_write(two_epochs, capsys):
    lines = (two_epochs / "metrics.jsonl").read_text().splitlines()
    edited = json.loads(lines[1]) | {"val_acc": 0.5}
    (two_epochs / "metrics.jsonl").write_text(lines[0] + "\n" + json.dumps(edited) + "\n")
    assert "not overwriting metrics this run would not reproduce" in resume_fails(two_epochs, capsys)
    (two_epochs / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    assert "metrics.jsonl: damaged at line 2" in resume_fails(two_epochs, capsys)


def test_resume_keeps_config_json_true(two_epochs):
    train(TrainConfig(epochs=3, hidden=16, seed=1), two_epochs, resume=True, progress=False)
    saved = json.loads((two_epochs / "config.json").read_text())
    assert saved["epochs"] == 3 and saved["identity"] == TrainConfig(epochs=3, hidden=16, seed=1).identity()


def test_a_run_is_identified_by_all_of_its_settings():
    base = TrainConfig()
    assert TrainConfig(lr=1).identity() == TrainConfig(lr=1.0).identity()  # the same setting, written two ways
    assert len({base.identity(), *(TrainConfig(**{name: value}).identity() for name, value in (
        ("epochs", 31), ("hidden", 255), ("batch_size", 64), ("data_dir", "/mnist"), ("seed", 1), ("lr", 0.1),
        ("depth", 2), ("track_ics", True), ("device", "cuda"), ("init_from", "/run"), ("momentum", 0.9)))}) == 12


def test_the_data_folder_is_one_setting_however_it_is_typed_and_wherever(tmp_path, monkeypatch, capsys):
    from test_data import write_mnist

    write_mnist(tmp_path / "a" / "idx", n_train=8)
    write_mnist(tmp_path / "b" / "idx", n_train=12)  # other digits, in a folder of the same relative name
    run = tmp_path / "run"
    tiny = [*TINY, "--batch-size", "4", "--data-dir"]
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", *tiny, "idx", "--epochs", "1", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["data_dir"] == str((tmp_path / "a" / "idx").resolve())
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert main(["train", *tiny, "idx", "--epochs", "2", "--out", str(run), "--resume"]) == 2
    assert f"other settings (data_dir {(tmp_path / 'a' / 'idx').resolve()}, asked " \
           f"{(tmp_path / 'b' / 'idx').resolve()})" in capsys.readouterr().err
    assert main(["train", *tiny, "../a/idx/", "--epochs", "2", "--out", str(run), "--resume"]) == 0
    assert len(read_metrics(run)) == 2


def test_a_cosine_run_cannot_be_extended_its_schedule_depends_on_its_length(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--schedule", "cosine", "--epochs", "1", "--out", str(run)]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", *TINY, "--schedule", "cosine", "--epochs", "2", "--out", str(run), "--resume"]) == 2
    assert capsys.readouterr().err == (f"backforward: error: {run}: a cosine schedule decays over the run's 1 epochs, "
                                       "so it cannot become a 2-epoch run; resume with --epochs 1, or train a new "
                                       "run with --epochs 2 into another --out\n")
    assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_a_run_that_fails_is_marked_failed_and_resumes_after_the_fix(tmp_path, monkeypatch, capsys):
    from backforward.experiments import train as train_module
    from backforward.experiments.files import CommandError

    run = tmp_path / "run"

    def full_disk(obj, path):
        raise CommandError(f"{path}: cannot write (No space left on device)")

    monkeypatch.setattr(train_module, "atomic_torch_save", full_disk)
    assert main(["train", *TINY, "--epochs", "2", "--out", str(run)]) == 2
    assert capsys.readouterr().err == (f"backforward: error: {run}/checkpoint.pt: cannot write (No space left on "
                                       "device); the run is marked failed after 0 of 2 epochs: fix that, then run "
                                       "the same command with --resume to continue\n")
    assert read_status(run) == {"status": "failed", "epochs": 0,
                                "message": f"{run}/checkpoint.pt: cannot write (No space left on device)"}
    monkeypatch.undo()
    assert main(["train", *TINY, "--epochs", "2", "--out", str(run), "--resume"]) == 0
    assert read_status(run) == {"status": "done", "epochs": 2} and len(read_metrics(run)) == 2


def test_ctrl_c_before_the_run_starts_does_not_suggest_resume(tmp_path, monkeypatch, capsys):
    from backforward.experiments import train as train_module

    def interrupted(_data_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "load", interrupted)
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == "backforward: interrupted before the run started\n"


def test_on_a_terminal_each_epoch_leaves_its_line_and_an_interrupt_starts_its_own(tmp_path, monkeypatch, capsys):
    from backforward.experiments import train as train_module

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar draws; capsys still reads what it wrote
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    epoch = read_metrics(tmp_path / "run")[0]
    line = capsys.readouterr().err.split("\n")[-2].split("\r")[-1]  # after the cleared bar
    assert line.startswith(f"epoch 1/1  train_loss {epoch['train_loss']:.4f}  val_acc {epoch['val_acc']:.4f}  (")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_train_step", interrupted)
    assert main(["train", *TINY, "--epochs", "2", "--out", str(tmp_path / "run"), "--resume"]) == 130
    last = capsys.readouterr().err.split("\n")[-2]
    assert last.split("\r")[-1] == ("backforward: interrupted after 1 of 2 epochs; run the same command with --resume "
                                    "to continue")


def test_a_config_json_that_is_not_an_object_is_one_line(two_epochs, capsys):
    (two_epochs / "config.json").write_text("[1, 2]\n")
    assert (f"{two_epochs}/config.json: not a run's settings (a JSON object expected, found list)"
            in resume_fails(two_epochs, capsys))
