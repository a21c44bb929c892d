"""Data-parallel Backforward with gloo on CPU: 2 processes equal 1 process on the full batch."""

import json
import multiprocessing
import os
import re
import subprocess
import sys

import pytest
import torch
from dist_workers import COMBOS, equality_worker, failing_worker, replica_worker, train_steps

from backforward.experiments.train import read_metrics

CLI = [sys.executable, "-m", "backforward.experiments"]


def spawn(target, tmp_path, world=2):
    context = multiprocessing.get_context("spawn")
    store, out = tmp_path / "store", tmp_path / "out"
    procs = [context.Process(target=target, args=(rank, world, str(store), str(out))) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert not p.is_alive(), "a process hung"
    return out, procs


def test_two_ranks_equal_one_rank_on_the_full_batch(tmp_path):
    out, procs = spawn(equality_worker, tmp_path)
    assert all(p.exitcode == 0 for p in procs)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for combo in COMBOS:
        single_params, single_losses = train_steps(*combo)
        for params, losses in (ranks[0][combo], ranks[1][combo]):
            for p, q in zip(params, single_params, strict=True):
                torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
            # Every rank reports the global (averaged) pass losses, as one process would.
            assert sum(losses, []) == pytest.approx(sum(single_losses, []), rel=1e-5)


def test_a_rank_that_dies_makes_the_other_fail_instead_of_hanging(tmp_path):
    out, procs = spawn(failing_worker, tmp_path)
    assert procs[1].exitcode == 17
    seconds, message = out.read_text().splitlines()
    assert message != "no error"
    assert float(seconds) < 60


def test_replica_check_raises_on_every_rank_when_parameters_differ(tmp_path):
    out, procs = spawn(replica_worker, tmp_path)
    assert all(p.exitcode == 0 for p in procs)
    for rank in range(2):
        assert "parameters differ across processes" in (tmp_path / f"out.{rank}").read_text()


def torchrun(*args, nproc=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "backforward.experiments", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("method, resume_on", [("sgd", 2), ("backforward", 1)])
def test_torchrun_train_equals_single_process_and_resumes(tmp_path, method, resume_on):
    args = ["train", "--method", method, "--hidden", "32", "--depth", "2", "--lr", "0.1"]
    single = tmp_path / "single"
    subprocess.run([*CLI, *args, "--epochs", "3", "--out", str(single)], check=True,
                   capture_output=True)
    multi = tmp_path / "multi"
    result = torchrun(*args, "--epochs", "2", "--out", str(multi))
    assert result.returncode == 0, result.stderr[-2000:]
    # One more epoch, resumed on 2 processes, or on 1: equal to float tolerance either way.
    resume = torchrun if resume_on == 2 else lambda *a: subprocess.run([*CLI, *a], capture_output=True, text=True)
    result = resume(*args, "--epochs", "3", "--out", str(multi), "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = read_metrics(single), read_metrics(multi)
    assert [m["epoch"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "weight_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
    assert json.loads((multi / "status.json").read_text())["status"] == "done"
    # only rank 0 wrote: config, metrics, checkpoint, status, and the lock it held
    assert sorted(p.name for p in multi.iterdir()) == [".lock", "checkpoint.pt", "config.json", "metrics.jsonl",
                                                       "status.json"]


def test_torchrun_rejects_a_batch_that_does_not_split(tmp_path):
    result = torchrun("train", "--batch-size", "127", "--epochs", "1", "--out", str(tmp_path / "r"))
    assert result.returncode != 0
    assert "not divisible by 2 processes" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_torchrun_bad_argument_exits_2_from_every_rank_in_one_line(tmp_path):
    result = torchrun("train", "--device", "cuda", "--epochs", "1", "--out", str(tmp_path / "r"))
    said = "backforward train: error: argument --device: device 'cuda' is not usable here"
    assert result.stderr.count(said) == 2  # one line from each rank
    assert re.findall(r"exitcode +: (-?\d+)", result.stderr) == ["2", "2"]  # torchrun's summary of the ranks


def test_bench_distributed_counts_one_all_reduce_per_pass():
    from backforward.experiments.bench import comm_records, default_suite
    from backforward.experiments.models import mlp

    records = {(r.model, r.method): r for r in comm_records(default_suite(["mlp"], [1, 3], 16, 8), steps=2)}
    for depth in (1, 3):
        bf, ddp = records[(f"mlp{depth}x16", "backforward")], records[(f"mlp{depth}x16", "ddp")]
        n = depth + 1
        parameter_bytes = 4 * sum(p.numel() for p in mlp(depth, 16).parameters())
        assert bf.calls_per_step == bf.predicted_calls == n
        # Gradients once, plus each pass's loss and one flag per parameter tensor (did this process use it?).
        assert bf.bytes_per_step == bf.predicted_bytes == parameter_bytes + 4 * n + 4 * 2 * n
        assert ddp.bytes_per_step == ddp.predicted_bytes == parameter_bytes
        assert ddp.calls_per_step == ddp.predicted_calls == 1  # one bucket: under DDP's first 1 MiB
        assert bf.ms_per_step > 0 and bf.predicted_ms > bf.compute_ms > 0
