"""The benchmark's arithmetic and memory accounting (no timing is asserted here)."""

import json

import pytest
import torch
from torch import nn

from backforward.experiments.bench import METHODS, SavedBytes, bench_model
from backforward.experiments.cli import main
from backforward.experiments.cost import predicted_units, stage_flops


@pytest.mark.parametrize("n", [2, 9])
def test_cost_model_for_equal_stages_matches_design_table(n):
    units = predicted_units([1.0] * n)
    assert units["sgd"] == 3 * n - 1
    assert units["paper"] == n * (3 * n - 1)
    assert units["generic"] == 1.5 * n * n + 0.5 * n
    assert units["fast"] == n * n + 2 * n - 1


def test_stage_flops_by_hand():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    assert stage_flops(model, torch.randn(5, 6)) == [5 * 6 * 4, 5 * 4 * 3]
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1))
    # output 1x3x4x4 = 48 values, each 2*3*3 = 18 multiply-adds
    assert stage_flops(conv, torch.randn(1, 2, 4, 4)) == [48 * 18]


def test_saved_bytes_counts_activations_not_parameters():
    lin = nn.Linear(3, 4, bias=False)
    x = torch.randn(5, 3)
    with SavedBytes(list(lin.parameters())) as counter:
        loss = lin(x).sum()
    # mm saves its input x (5x3 float32) for the weight gradient; the weight itself is excluded.
    assert counter.peak == 5 * 3 * 4
    del loss
    h = torch.randn(5, 3, requires_grad=True)
    with SavedBytes([]) as counter:
        (h.exp() * 2).sum()  # exp saves its output: 60 bytes
    assert counter.peak == 60


def test_bench_records_and_the_memory_bound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    records = bench_model("tiny", 2, model, torch.randn(32, 8), torch.randint(0, 4, (32,)), steps=2, warmup=1)
    assert [r.method for r in records] == list(METHODS)
    by = {r.method: r for r in records}
    assert by["sgd"].ratio_to_sgd == 1.0
    flops = [32 * 8 * 16, 32 * 16 * 16, 32 * 16 * 4]
    sgd = 3 * sum(flops) - flops[0]
    assert by["paper"].predicted_ratio == pytest.approx(3.0)
    fast = sum(flops) + flops[0] + flops[1] + flops[2] + (sum(flops) + flops[1] + flops[2]) + (
        flops[1] + flops[2] + flops[2])
    assert by["fast"].predicted_ratio == pytest.approx(fast / sgd)
    assert by["fast"].saved_bytes <= by["sgd"].saved_bytes
    assert by["paper"].saved_bytes == by["sgd"].saved_bytes > 0


def test_bench_command_json(tmp_path, capsys):
    plot = tmp_path / "bench.png"
    assert main(["bench", "--steps", "1", "--warmup", "0", "--depths", "1", "--width", "8",
                 "--batch-size", "4", "--no-cnn", "--json", "--out", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {tuple(sorted(r)) for r in rows} == {("depth", "method", "model", "ms_per_step", "predicted_ratio",
                                                 "ratio_to_sgd", "saved_bytes")}
    assert [r["method"] for r in rows] == list(METHODS)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_profile_prints_where_a_step_goes(capsys):
    assert main(["bench", "--profile", "--depths", "1", "--width", "8", "--batch-size", "4", "--no-cnn"]) == 0
    out = capsys.readouterr().out
    assert "mlp1x8: plain SGD step" in out and "aten::" in out
