"""Running many training runs: in parallel processes, each resumable, finished ones reused only if identical.

A sweep declares each run by a name and a ``TrainConfig``; the sweep completes the settings
(data folder, the folder a fine-tuning run starts from) and gives the run its own folder,
``OUT/runs/NAME-IDENTITY``, the identity being a hash of every setting. A finished run is
reused only by a sweep that asks for exactly its settings; any other settings train into
another folder, so runs of ``reproduce --quick`` and ``reproduce`` never mix. Reading the
results checks every run's saved settings again and refuses a folder that holds another run.

One sweep writes into ``OUT`` at a time (a lock). Workers stop when their parent dies, and
the parent stops them first on Ctrl-C or SIGTERM; every stopped run is marked interrupted
and resumes from its last epoch when the command runs again.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

from . import launch
from .files import CommandError, absolute_path, folder_lock, lock_holder
from .progress import Progress
from .report import markdown_table
from .train import Diverged, TrainConfig, holds_run, read_config, read_metrics, read_status, train

FINISHED = ("done", "diverged")
THREADS_PER_RUN = 1  # whatever --jobs: the same settings give the same metrics, bit for bit, on one machine


@dataclass(frozen=True)
class Run:
    """One run of a sweep: the name the analysis looks it up by, its settings, and the run of the same
    sweep whose final model it starts from (fine-tuning), if any."""

    name: str
    config: TrainConfig
    start_from: Run | None = None


@dataclass(frozen=True)
class Placed:
    """A run with its settings completed (data folder, the folder it starts from) and its own folder."""

    run: Run
    config: TrainConfig
    folder: Path


class WorkerDied(Exception):
    """A worker process was killed from outside (kill -9, the out-of-memory killer) while training a run."""


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def place(runs: Sequence[Run], out: Path, data_dir: str | None = None) -> list[Placed]:
    """Complete each run's settings and name its folder after them: ``OUT/runs/NAME-IDENTITY``."""
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("run names must be unique")
    sources = [r.start_from.name for r in runs if r.start_from is not None]
    if not set(sources) <= set(names):
        raise ValueError(f"runs start from runs outside the sweep: {sorted(set(sources) - set(names))}")
    data_dir = absolute_path(data_dir) if data_dir else None
    placed: dict[str, Placed] = {}

    def complete(run: Run) -> Placed:
        if run.name not in placed:
            init_from = str(complete(run.start_from).folder.resolve()) if run.start_from else run.config.init_from
            config = replace(run.config, data_dir=data_dir, init_from=init_from)
            placed[run.name] = Placed(run, config, out / "runs" / f"{run.name}-{config.identity()}")
        return placed[run.name]

    return [complete(r) for r in runs]


class Results(Mapping):
    """Every run's metrics by run name; ``settings()`` states the settings of every run read, for the report."""

    def __init__(self, placed: Sequence[Placed], metrics: dict[str, list[dict]]) -> None:
        self.placed, self.metrics = list(placed), metrics

    def __getitem__(self, name: str) -> list[dict]:
        return self.metrics[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def settings(self) -> str:
        """Markdown: the settings all runs share, and a row per run with those that vary and its folder."""
        rows = [p.config.canonical() for p in self.placed]
        keys = list(rows[0]) if rows else []
        shared = [k for k in keys if all(r[k] == rows[0][k] for r in rows)]
        varying = [k for k in keys if k not in shared]
        common = ", ".join(f"{k} {_shown(k, rows[0][k])}" for k in shared)
        table = markdown_table(["run", *varying, "epochs done", "folder"],
                               [[p.run.name, *(_shown(k, r[k]) for k in varying), len(self.metrics[p.run.name]),
                                 f"`runs/{p.folder.name}`"] for p, r in zip(self.placed, rows, strict=True)])
        return (f"<details><summary>Settings of the {len(rows)} runs read</summary>\n\n"
                f"Common to all: {common}.\n\n{table}\n\n</details>\n")


def _shown(key: str, value: object) -> object:
    if key == "data_dir" and value is None:
        return "the embedded digits"
    if key == "init_from" and value:
        return Path(str(value)).name
    return value


def run_all(runs: Sequence[Run], out: Path, jobs: int, data_dir: str | None = None, desc: str = "runs") -> Results:
    """Train what is not finished; return every run's metrics by name, checked against its settings.

    ``jobs`` processes run at once, each with one torch thread: the thread count changes the order
    of float sums, so a run's metrics would otherwise depend on ``jobs``, which its identity
    leaves out. Runs that start from another (``start_from``) wait for it.
    """
    with folder_lock(out):
        placed = place(runs, out, data_dir)
        pending = [p for p in placed if read_status(p.folder)["status"] not in FINISHED]
        threads = THREADS_PER_RUN
        by_name = {p.run.name: p for p in pending}
        with Progress(len(placed), desc, unit="run", initial=len(placed) - len(pending)) as bar:
            for wave in _waves([p.run for p in pending]):
                wave = [by_name[r.name] for r in wave]
                if jobs == 1 or len(wave) == 1:
                    for p in wave:
                        _run_one(p.config, p.folder, threads)
                        bar.update(1)
                else:
                    _run_parallel(wave, min(jobs, len(wave)), threads, bar)
        return Results(placed, {p.run.name: _checked_metrics(p) for p in placed})


def _checked_metrics(p: Placed) -> list[dict]:
    """The run's metrics, after checking that its folder holds exactly the run asked for, finished."""
    saved = read_config(p.folder / "config.json")
    differ = saved.differences(p.config)
    if differ:
        raise CommandError(f"{p.folder}: holds a run with other settings ({'; '.join(differ)}); not mixing it "
                           "into the results (move the folder away to train it again)")
    metrics, status = read_metrics(p.folder), read_status(p.folder)["status"]
    if status not in FINISHED or (status == "done") != (len(metrics) == p.config.epochs):
        raise CommandError(f"{p.folder}: status {status} with {len(metrics)} of {p.config.epochs} epochs; "
                           "not mixing an unfinished run into the results")
    return metrics


def _waves(pending: Sequence[Run]) -> list[list[Run]]:
    """Pending runs in waves: a run that starts from another pending run's model comes after it."""
    waves: list[list[Run]] = []
    left = list(pending)
    while left:
        waiting_for = {r.name for r in left}
        ready = [r for r in left if not (r.start_from and r.start_from.name in waiting_for)]
        if not ready:
            raise ValueError("runs start from each other in a cycle")
        waves.append(ready)
        left = [r for r in left if r not in ready]
    return waves


def _run_one(config: TrainConfig, folder: Path, threads: int) -> str:
    import torch

    torch.set_num_threads(threads)
    try:
        train(config, folder, resume=holds_run(folder), progress=False)
    except Diverged:
        return "diverged"
    return "done"


def _run_parallel(wave: Sequence[Placed], workers: int, threads: int, bar: Progress) -> None:
    """The wave's runs in ``workers`` processes; on any failure or interrupt, stop them all before raising."""
    context = multiprocessing.get_context("spawn")  # fork after torch starts its threads can hang
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_started,
                               initargs=(os.getpid(),))
    processes: dict = {}
    try:
        futures = [pool.submit(_worker_run, p.config, p.folder, threads) for p in wave]
        processes = dict(getattr(pool, "_processes", None) or {})  # pid -> Process; the executor keeps no public list
        for future in as_completed(futures):
            future.result()
            bar.update(1)
    except BrokenProcessPool:
        pool.shutdown(wait=True, cancel_futures=True)
        raise WorkerDied(_who_died(wave, processes)) from None
    except BaseException:
        for process in processes.values():  # stopped with SIGTERM, each marks its run interrupted
            if process.is_alive():
                process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _who_died(wave: Sequence[Placed], processes: dict) -> str:
    codes = {pid: p.exitcode for pid, p in processes.items() if p.exitcode not in (None, 0)}
    for p in wave:
        pid = lock_holder(p.folder)
        if pid in codes and read_status(p.folder)["status"] == "running":  # the others were marked interrupted
            code = codes[pid]
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            return (f"the worker process training {p.folder} (pid {pid}) died ({how}); "
                    "run the same command again to resume")
    return "a worker process died; run the same command again to resume"


def _worker_started(parent: int) -> None:
    """In each worker: Ctrl-C is the parent's to handle, and a worker whose parent has died stops itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()


def _stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)


def _worker_run(config: TrainConfig, folder: Path, threads: int) -> str:
    """``_run_one`` in a worker: SIGTERM marks the run interrupted, then ends the worker."""
    try:
        with launch.sigterm_raises():
            return _run_one(config, folder, threads)
    except launch.Terminated:
        sys.stderr.flush()
        os._exit(launch.EXIT_TERMINATED)
