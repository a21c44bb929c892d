"""Processes: torchrun's environment and process groups, rank-0 I/O, signals that stop a run cleanly, a clean exit."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over all processes (itself when not distributed)."""
    if rank_and_world()[1] == 1:
        return values
    summed = values.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def barrier() -> None:
    """Wait until every process gets here (at once when not distributed)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started (it sets these for every rank)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@contextmanager
def process_group(device: str = "cpu", timeout_s: float = 300.0) -> Iterator[None]:
    """Initialise the default process group from torchrun's environment: gloo on CPU, NCCL on CUDA.

    The timeout makes a rank that waits on a failed peer give up with an error instead of hanging.
    """
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every process, in rank order (``[obj]`` when not distributed)."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def exit_without_shutdown(code: int) -> None:
    """Flush and end a process that used gloo, skipping the interpreter's shutdown.

    Gloo's worker threads can release their last tensors a moment after the collectives
    return; if that happens while the interpreter is shutting down, taking the GIL aborts
    the process (SIGABRT, "terminate called without an active exception"), turning a
    finished run into a failed one. Every file this project writes is already complete
    and synced by then, so leaving with ``os._exit`` loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Terminated(BaseException):
    """SIGTERM (what schedulers, ``kill`` and torchrun send), raised in the main thread as Ctrl-C raises
    ``KeyboardInterrupt``, so that a run stops the same clean way: finished epochs kept, status marked."""


INTERRUPTS = (KeyboardInterrupt, Terminated)
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130 and 143, as shells report


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut short the cleanup
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside, SIGTERM raises ``Terminated`` in the main thread; the previous handler is back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Inside, Ctrl-C and SIGTERM wait for the block to finish, then act as usual: files that belong
    together (a checkpoint, its metrics, the status) are written together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT,
                                                                                          signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


def exit_code(interrupt: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
