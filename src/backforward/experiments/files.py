"""The harness's files: atomic writes, one writer per folder, and readers that fail in one line.

A file written here is either its old self or complete, never half-written; it gets the
permissions an ordinary ``open()`` would give it (0666 less the umask). Every problem with a
file (disk full, read-only folder, damaged JSON, a folder another process is writing into)
raises ``CommandError`` with one line naming the path; the command line prints it and exits 2.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

LOCK_FILE = ".lock"


class CommandError(Exception):
    """A problem the user can act on, said in one line; the command line prints it and exits with status 2."""


def os_problem(path: str | os.PathLike, e: OSError, doing: str = "cannot write") -> CommandError:
    return CommandError(f"{path}: {doing} ({e.strerror or e})")


def absolute_path(path: str | os.PathLike | None) -> str | None:
    """``path`` resolved (``~``, ``..``, links, the current folder): one folder, however it was typed.

    Settings that name a folder (the data, the run to start from) are part of a run's identity
    in this form, so ``idx``, ``./idx/`` and the absolute path are one setting, and ``idx`` typed
    in another folder is another."""
    return None if path is None else str(Path(path).expanduser().resolve())


def make_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder, created if missing; one line if it is a file or cannot be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CommandError(f"{path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_problem(path, e, "cannot create the folder") from None
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    make_folder(path.parent)
    tmp = None
    try:
        # os.open, not tempfile.mkstemp: mkstemp's files are 0600 whatever the umask.
        while tmp is None:
            candidate = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                tmp = candidate
            except FileExistsError:
                continue
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise os_problem(path, e) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise CommandError(f"{path}: damaged ({e.msg}, line {e.lineno})") from None


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CommandError(f"{path}: damaged at line {number} ({e.msg})") from None
    return rows


_held: dict[Path, list] = {}  # folders this process holds: [lock file, depth]; a holder may take it again


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder`` (created if missing) for this process alone: one writer per run or sweep folder.

    An exclusive ``flock`` on ``FOLDER/.lock``, which holds the holder's PID. The kernel drops it when
    the process ends, however it ends, so a killed writer never blocks a resume. A second process
    gets ``CommandError`` naming the holder's PID at once, rather than waiting.
    """
    folder = make_folder(folder).resolve()
    if folder in _held:
        _held[folder][1] += 1
        try:
            yield
        finally:
            _held[folder][1] -= 1
        return
    path = folder / LOCK_FILE
    try:
        handle = open(path, "a+")  # noqa: SIM115 - held open for as long as the lock
    except OSError as e:
        raise os_problem(path, e, "cannot open the lock file") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise CommandError(f"{folder}: in use by {who} (one writer per folder); wait for it or stop it") \
                from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _held[folder] = [handle, 1]
        try:
            yield
        finally:
            del _held[folder]
    finally:
        handle.close()  # closing the file releases the lock


def lock_holder(folder: str | os.PathLike) -> int | None:
    """The PID written by the last process that held ``folder``'s lock (None if none did)."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
