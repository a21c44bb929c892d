"""The toy experiment: both methods start from the same weights and batch; arms change one setting each."""

import math

import torch
from torch import nn

from backforward.experiments.cli import main
from backforward.experiments.data import MEAN, STD, load_embedded
from backforward.experiments.models import mlp
from backforward.experiments.toy import PAPER, ToyConfig, summarize_toy, toy_arms, toy_trial


def test_toy_trial_sgd_arm_is_one_plain_sgd_step():
    config = ToyConfig(hidden=32, lr=1.0)
    data = load_embedded()
    trial = toy_trial(data, config, seed=3)
    idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(3))[:4]
    x, y = data.x_train[idx], data.y_train[idx]
    torch.manual_seed(3)
    model = mlp(1, 32)
    loss = nn.functional.cross_entropy(model(x), y)
    assert trial["before"] == float(loss.detach())
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1.0 * p.grad
        assert trial["sgd"] == float(nn.functional.cross_entropy(model(x), y))
    assert trial["backforward"] != trial["sgd"]


def test_raw_inputs_are_the_pixels_in_0_1():
    data = load_embedded()
    raw = toy_trial(data, ToyConfig(hidden=16, inputs="raw"), seed=0)
    idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:4]
    x = data.x_train[idx] * STD + MEAN
    assert float(x.min()) >= -1e-6 and float(x.max()) <= 1 + 1e-6
    torch.manual_seed(0)
    with torch.no_grad():
        assert raw["before"] == float(nn.functional.cross_entropy(mlp(1, 16)(x), data.y_train[idx]))


def test_arms_change_one_setting_each():
    arms = toy_arms()
    assert arms[0] == PAPER and PAPER.seeds == 100 and PAPER.hidden == 256
    changed = [{k for k in ("hidden", "inputs", "init") if getattr(a, k) != getattr(PAPER, k)} for a in arms[1:]]
    assert changed == [{"hidden"}, {"hidden"}, {"inputs"}, {"init"}]
    assert [a.hidden for a in arms[:3]] == [256, 64, 1024]
    # Kaiming init draws other starting weights from the same seed, so the loss before the step differs.
    data = load_embedded()
    assert toy_trial(data, arms[4], 0)["before"] != toy_trial(data, arms[0], 0)["before"]


def test_summary_by_hand():
    trials = [{"before": 2.0, "sgd": s, "backforward": b} for s, b in ((1.0, 0.001), (3.0, 0.5), (5.0, 0.002))]
    summary = summarize_toy(trials, zero_tol=0.01)
    assert summary["sgd"]["median"] == 3.0 and summary["sgd"]["reached_zero"] == 0.0
    assert summary["backforward"]["reached_zero"] == 2 / 3
    assert summary["both"]["backforward_lower"] == 1.0


def test_toy_command_prints_the_table(capsys):
    assert main(["toy", "--seeds", "2", "--hidden", "16"]) == 0
    out = capsys.readouterr().out
    assert "after SGD" in out and "after Backforward" in out and "2 seeds" in out


def test_a_step_that_diverges_counts_as_an_infinite_loss_not_a_traceback():
    trial = toy_trial(load_embedded(), ToyConfig(seeds=1, hidden=8, lr=3.4e38), seed=0)
    assert trial["sgd"] == math.inf and trial["backforward"] == math.inf
