"""The harness's files: the umask respected, one writer per folder, disk faults in one line."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from backforward.experiments import files
from backforward.experiments.cli import main
from backforward.experiments.files import atomic_write_text

# New names are imported inside the tests that need them, so that each test of this file can be run
# against the code before them and fail on its own assertion.


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "REPORT.md", "text\n")
        with open(tmp_path / "plain.md", "w") as f:
            f.write("text\n")
    finally:
        os.umask(old)
    assert (tmp_path / "REPORT.md").stat().st_mode & 0o777 == mode == (tmp_path / "plain.md").stat().st_mode & 0o777


def hold_lock_in_another_process(folder):
    """A process that holds ``folder``'s lock until its stdin closes; returns it once it holds it."""
    code = textwrap.dedent(f"""
        import sys
        from backforward.experiments.files import folder_lock
        with folder_lock({str(folder)!r}):
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_writer_is_told_which_process_holds_the_folder(tmp_path):
    from backforward.experiments.files import CommandError, folder_lock

    holder = hold_lock_in_another_process(tmp_path / "run")
    try:
        with pytest.raises(CommandError, match=f"in use by process {holder.pid}"), folder_lock(tmp_path / "run"):
            pass
    finally:
        holder.stdin.close()
        holder.wait()
    with folder_lock(tmp_path / "run"), folder_lock(tmp_path / "run"):  # free again; the holder may nest it
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    from backforward.experiments.files import folder_lock

    holder = hold_lock_in_another_process(tmp_path / "run")
    holder.kill()
    holder.wait()
    with folder_lock(tmp_path / "run"):
        assert files.lock_holder(tmp_path / "run") == os.getpid()


def test_reproduce_into_a_folder_in_use_says_so_in_one_line(tmp_path, capsys):
    holder = hold_lock_in_another_process(tmp_path)
    try:
        assert main(["reproduce", "--quick", "--out", str(tmp_path)]) == 2
    finally:
        holder.stdin.close()
        holder.wait()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"in use by process {holder.pid}" in err


def fault(number):
    def raise_it(*args, **kwargs):
        raise OSError(number, os.strerror(number))
    return raise_it


@pytest.mark.parametrize("number, patch", [(errno.ENOSPC, "fsync"), (errno.EROFS, "open"), (errno.EACCES, "replace")])
def test_disk_faults_are_one_line_naming_the_file_and_leave_it_whole(tmp_path, monkeypatch, number, patch):
    from backforward.experiments.files import CommandError

    target = tmp_path / "metrics.jsonl"
    atomic_write_text(target, "old\n")
    monkeypatch.setattr(files.os, patch, fault(number))
    with pytest.raises(CommandError) as caught:
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert str(caught.value) == f"{target}: cannot write ({os.strerror(number)})"
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left behind


def test_train_on_a_full_disk_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files.os, "fsync", fault(errno.ENOSPC))
    assert main(["train", "--epochs", "1", "--hidden", "16", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and str(tmp_path / "run") in err


def test_train_into_a_read_only_folder_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files.Path, "mkdir", fault(errno.EROFS))
    assert main(["train", "--epochs", "1", "--hidden", "16", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Read-only file system" in err and str(tmp_path / "run") in err


def test_a_damaged_json_lines_file_is_named_with_its_line(tmp_path):
    from backforward.experiments.files import CommandError, read_jsonl

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "train_lo\n')
    with pytest.raises(CommandError, match=r"metrics.jsonl: damaged at line 2 \("):
        read_jsonl(tmp_path / "metrics.jsonl")
