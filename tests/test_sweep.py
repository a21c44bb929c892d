"""Sweeps of runs: a run is its settings, finished runs reused only when identical, no orphaned workers."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backforward.experiments.sweep import Run, _waves, run_all
from backforward.experiments.train import TrainConfig, read_metrics, read_status, train

# New names are imported inside the tests that need them, so that each test of this file can be run
# against the code before them and fail on its own assertion.


def folders(out, runs):
    """Each run's folder: ``OUT/runs/NAME-IDENTITY``."""
    return {r.name: out / "runs" / f"{r.name}-{r.config.identity()}" for r in runs}


def test_run_all_resumes_an_interrupted_run_and_skips_finished_ones(tmp_path):
    runs = [Run(f"r{s}", TrainConfig(epochs=1, hidden=8, seed=s)) for s in range(2)]
    first = run_all(runs, tmp_path, jobs=1)
    where = folders(tmp_path, runs)
    stamp = (where["r0"] / "metrics.jsonl").stat().st_mtime_ns
    (where["r1"] / "status.json").unlink()  # as if r1 was interrupted before finishing
    second = run_all(runs, tmp_path, jobs=1)
    assert (where["r0"] / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert [m["val_acc"] for m in second["r1"]] == [m["val_acc"] for m in first["r1"]]


def test_finished_runs_are_reused_only_by_the_same_settings(tmp_path):
    quick = [Run(f"r{s}", TrainConfig(epochs=1, hidden=8, seed=s)) for s in range(2)]
    full = [Run(f"r{s}", TrainConfig(epochs=2, hidden=8, seed=s)) for s in range(2)]
    run_all(quick, tmp_path, jobs=1)
    stamps = {p: (p / "metrics.jsonl").stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()}
    results = run_all(full, tmp_path, jobs=1)  # the same names, more epochs: trained anew, in other folders
    assert [len(results[f"r{s}"]) for s in range(2)] == [2, 2]
    assert len(list((tmp_path / "runs").iterdir())) == 4
    assert "Common to all: method sgd, lr 0.05, epochs 2, batch_size 128, hidden 8," in results.settings()
    again = run_all(quick, tmp_path, jobs=1)  # the quick runs are still there, untouched
    assert [len(again[f"r{s}"]) for s in range(2)] == [1, 1]
    assert stamps == {p: (p / "metrics.jsonl").stat().st_mtime_ns for p in stamps}


def test_a_folder_that_holds_another_run_is_not_mixed_into_the_results(tmp_path):
    from backforward.experiments.files import CommandError

    runs = [Run("r0", TrainConfig(epochs=1, hidden=8))]
    run_all(runs, tmp_path, jobs=1)
    folder = folders(tmp_path, runs)["r0"]
    train(TrainConfig(epochs=2, hidden=8), folder, resume=True, progress=False)  # extended by hand
    with pytest.raises(CommandError, match="holds a run with other settings .epochs 2, asked 1.; not mixing it"):
        run_all(runs, tmp_path, jobs=1)


def test_a_damaged_metrics_file_of_a_finished_run_is_one_line(tmp_path):
    from backforward.experiments.files import CommandError

    runs = [Run("r0", TrainConfig(epochs=1, hidden=8))]
    run_all(runs, tmp_path, jobs=1)
    metrics = folders(tmp_path, runs)["r0"] / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:30])
    with pytest.raises(CommandError, match=f"{metrics}: damaged at line 1"):
        run_all(runs, tmp_path, jobs=1)


def test_runs_that_start_from_another_run_wait_for_it_and_name_its_folder(tmp_path):
    from backforward.experiments.sweep import place

    pre = Run("pre", TrainConfig())
    tuned = Run("tuned", TrainConfig(), start_from=pre)
    other = Run("other", TrainConfig(seed=1))
    assert _waves([tuned, pre, other]) == [[pre, other], [tuned]]
    assert _waves([tuned]) == [[tuned]]  # its source already finished
    placed = {p.run.name: p for p in place([pre, tuned, other], tmp_path)}
    assert placed["tuned"].config.init_from == str(placed["pre"].folder.resolve())
    with pytest.raises(ValueError, match="outside the sweep"):
        place([tuned], tmp_path)


# ---- processes: the parent and its workers ----

SWEEP = """
import sys
from backforward.experiments import cli, studies
studies.QUICK = studies.StudyConfig(seeds=1, epochs=300, hidden=16)  # 3 long runs of tiny models
sys.exit(cli.main(["study", "order", "--quick", "--jobs", "2", "--out", sys.argv[1]]))
"""


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has stopped
    except (FileNotFoundError, IndexError):
        return False


def workers_of(pid):
    """The multiprocessing workers whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(") ")[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (FileNotFoundError, IndexError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def start_sweep(out):
    """A ``study`` process with 2 workers, returned with their PIDs once both have trained an epoch."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SWEEP), str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline, "the sweep should be running"
        started = [f for f in (out / "runs").glob("*") if read_metrics(f)] if (out / "runs").exists() else []
        workers = workers_of(proc.pid)
        if len(started) == 2 and len(workers) == 2:
            return proc, workers, started
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_stop_when_the_parent_is_killed_or_terminated(tmp_path, sig):
    proc, workers, started = start_sweep(tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    deadline = time.time() + 20
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers), "workers kept training after their parent stopped"
    assert all(read_status(f)["status"] == "interrupted" for f in started)
    assert "Traceback" not in err
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
        assert err.strip().splitlines()[-1] == ("backforward: stopped by SIGTERM; run the same command again to "
                                                "continue (finished runs are kept)")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")
def test_a_killed_worker_is_one_line_naming_its_run(tmp_path):
    proc, workers, started = start_sweep(tmp_path)
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("backforward: error: the worker process training ")
    folder = Path(line.split("training ")[1].split(" (pid")[0])
    assert f"(pid {victim}) died (killed by SIGKILL); run the same command again to resume" in line
    assert folder in started and json.loads((folder / "status.json").read_text())["status"] == "running"
    assert not any(alive(w) for w in workers)



def test_every_run_gets_one_thread_whatever_jobs_so_results_do_not_depend_on_it(tmp_path, monkeypatch):
    import torch

    from backforward.experiments import sweep

    threads = []

    def recording_train(*args, **kwargs):
        threads.append(torch.get_num_threads())
        return train(*args, **kwargs)

    monkeypatch.setattr(sweep, "default_jobs", lambda: 4)  # a 4-core machine, 1 job: formerly 4 threads
    monkeypatch.setattr(sweep, "train", recording_train)
    try:
        run_all([Run("a", TrainConfig(epochs=1, hidden=8))], tmp_path, jobs=1)
    finally:
        torch.set_num_threads(1)
    assert threads == [1]
