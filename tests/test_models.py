"""The experiments' models and initialisations, and the run settings that pick them."""

import json
import math

import pytest
import torch
from torch import nn

from backforward.experiments import train as train_module
from backforward.experiments.models import build, initialise, linear_stage_names, mlp, residual_mlp
from backforward.experiments.train import TrainConfig, build_base, build_model, train


def test_default_init_is_pytorchs():
    torch.manual_seed(0)
    plain = mlp(2, 16)
    torch.manual_seed(0)
    built = build("mlp", 2, 16, init="default")
    for p, q in zip(plain.parameters(), built.parameters(), strict=True):
        assert torch.equal(p, q)


def test_kaiming_keeps_a_relu_layers_variance():
    torch.manual_seed(0)
    model = build("mlp", 2, 512, init="kaiming")
    first, head = model[0], model[-1]
    assert float(first.weight.detach().var()) == pytest.approx(2 / 784, rel=0.02)  # 401,408 draws: var within 2%
    assert float(head.weight.detach().var()) == pytest.approx(1 / 512, rel=0.05)   # the output layer: gain 1
    assert float(first.bias.detach().abs().max()) == 0.0
    # The point of it: at 16 hidden layers the signal keeps its scale (PyTorch's default shrinks it ~√6 a layer).
    x = torch.randn(256, 784)
    torch.manual_seed(1)
    deep = build("mlp", 16, 256, init="kaiming")
    torch.manual_seed(1)
    default = build("mlp", 16, 256)
    with torch.no_grad():
        assert float(deep[:-1](x).pow(2).mean()) > 0.2 and float(default[:-1](x).pow(2).mean()) < 0.01


def test_orthogonal_is_an_isometry_for_a_linear_network():
    torch.manual_seed(0)
    dln = build("linear", 24, 32, init="orthogonal")
    assert not any(isinstance(m, nn.ReLU) for m in dln)
    w = dln[1].weight
    assert torch.allclose(w @ w.T, torch.eye(32), atol=1e-5)  # gain 1 without ReLUs
    with pytest.raises(ValueError, match="unknown initialisation"):
        initialise(mlp(), "xavier")


def test_architectures_and_their_linear_stages():
    x = torch.randn(3, 784)
    for arch in ("mlp", "linear", "resmlp", "cnn"):
        assert build(arch, 2, 16)(x).shape == (3, 10)
    res = residual_mlp(2, 16)
    assert linear_stage_names(res) == ["0", "2.inner", "2.outer", "3.inner", "3.outer", "4"]
    block = res[2]
    h = torch.randn(3, 16)
    assert torch.allclose(block(h), torch.relu(h + block.outer(torch.relu(block.inner(h)))))
    assert linear_stage_names(mlp(2, 8, batchnorm=True)) == ["0", "3", "6"]


def test_train_config_picks_model_and_base_optimizer():
    config = TrainConfig(arch="resmlp", depth=2, hidden=16, init="kaiming", base="adam", lr=0.001)
    config.validate()
    assert isinstance(build_base(config, build_model(config).parameters()), torch.optim.Adam)
    momentum = build_base(TrainConfig(momentum=0.9), mlp(1, 8).parameters())
    assert isinstance(momentum, torch.optim.SGD) and momentum.param_groups[0]["momentum"] == 0.9
    for field, value in (("arch", "rnn"), ("init", "xavier"), ("base", "lbfgs"), ("ics_every", 0)):
        with pytest.raises(ValueError, match=field.replace("_", "-") if field == "ics_every" else field):
            TrainConfig(**{field: value}).validate()


def test_eval_train_and_scale_free_ics(tmp_path, monkeypatch):
    metered = []
    plain_ics = train_module._plain_ics
    monkeypatch.setattr(train_module, "_plain_ics", lambda *a: metered.append(1) or plain_ics(*a))
    config = TrainConfig(epochs=1, depth=2, hidden=16, batch_size=500, track_ics=True, ics_every=3, eval_train=True)
    metrics = train(config, tmp_path / "run", progress=False)
    assert len(metered) == 3  # steps 0, 3, 6 of the 8 in an epoch of 4,000 digits
    record = metrics[0]
    assert 0 <= record["train_eval_acc"] <= 1 and record["train_eval_loss"] > 0
    first, *rest = record["ics"].values()
    assert first["grad_shift"] == 0.0 and first["rel_shift"] == 0.0  # stage 1 moves first: no shift
    for stage in rest:
        assert stage["rel_shift"] > 0 and math.isfinite(stage["grad_norm"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["ics_every"] == 3 and saved["eval_train"] is True
