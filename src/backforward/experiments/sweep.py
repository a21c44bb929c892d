"""Running many training runs: in parallel processes, each resumable, finished ones skipped.

Each run lives in ``OUT/runs/NAME``; an interrupted batch of runs picks up where it
stopped, because every run resumes from its own checkpoint and finished (or diverged)
runs are not run again.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

from .train import ConfigMismatch, Diverged, TrainConfig, read_metrics, read_status, train

FINISHED = ("done", "diverged")


@dataclass(frozen=True)
class Run:
    name: str
    config: TrainConfig


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_all(runs: Sequence[Run], out: Path, jobs: int, data_dir: str | None = None,
            desc: str = "runs") -> dict[str, list[dict]]:
    """Run what is not finished; return every run's metrics by name.

    ``jobs`` processes run at once, each with cores ÷ jobs torch threads, so the machine is
    not oversubscribed. Runs that depend on another (``init_from``) wait for it.
    """
    from tqdm import tqdm

    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("run names must be unique")
    runs = [Run(r.name, replace(r.config, data_dir=data_dir)) for r in runs]
    pending = [r for r in runs if read_status(out / "runs" / r.name)["status"] not in FINISHED]
    threads = max(1, default_jobs() // jobs)
    with tqdm(total=len(runs), initial=len(runs) - len(pending), desc=desc, unit="run",
              disable=not sys.stderr.isatty()) as bar:
        for wave in _waves(pending):
            if jobs == 1 or len(wave) == 1:
                for run in wave:
                    _run_one(run.config, out / "runs" / run.name, threads)
                    bar.update(1)
                continue
            context = multiprocessing.get_context("spawn")  # fork after torch starts its threads can hang
            with ProcessPoolExecutor(max_workers=min(jobs, len(wave)), mp_context=context) as pool:
                futures = [pool.submit(_run_one, r.config, out / "runs" / r.name, threads) for r in wave]
                for future in as_completed(futures):
                    future.result()
                    bar.update(1)
    return {r.name: read_metrics(out / "runs" / r.name) for r in runs}


def _waves(pending: Sequence[Run]) -> list[list[Run]]:
    """Pending runs in waves: a run that starts from another pending run's model comes after it."""
    waves: list[list[Run]] = []
    left = list(pending)
    while left:
        waiting_for = {r.name for r in left}
        ready = [r for r in left if not (r.config.init_from and Path(r.config.init_from).name in waiting_for)]
        if not ready:
            raise ValueError("runs start from each other in a cycle")
        waves.append(ready)
        left = [r for r in left if r not in ready]
    return waves


def _run_one(config: TrainConfig, out: Path, threads: int) -> str:
    import torch

    torch.set_num_threads(threads)
    try:
        train(config, out, resume=True, progress=False)
    except Diverged:
        return "diverged"
    except ConfigMismatch as e:
        raise RuntimeError(f"{e}; remove {out} to rerun it with the new settings") from None
    return "done"
