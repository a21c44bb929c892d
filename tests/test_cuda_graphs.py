"""Whole-step CUDA graphs: exact against eager steps where a GPU is present; clear refusals everywhere."""

import copy

import pytest
import torch
from torch import nn

from backforward import Backforward, CapturedStep
from backforward.cuda_graphs import _state_missing

F = nn.functional
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def mlp(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 32),
                         nn.ReLU(), nn.Linear(32, 5))


def test_a_model_on_the_cpu_is_refused_in_one_line():
    model = mlp()
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    opt.step_batch(x, y, F.cross_entropy)
    with pytest.raises(ValueError, match="must be on a CUDA device") as info:
        CapturedStep(opt, x, y, F.cross_entropy)
    assert "\n" not in str(info.value)


def test_only_state_some_parameters_lack_counts_as_missing():
    # Created inside a capture, state would be created afresh at every replay; an optimizer that keeps no state
    # (plain SGD) has none to create.
    model = mlp()
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    for make, expected in ((lambda ps: torch.optim.SGD(ps, lr=0.1), False),
                           (lambda ps: torch.optim.Adam(ps, lr=1e-3), False)):
        opt = Backforward(model, make(model.parameters()))
        opt.step_batch(x, y, F.cross_entropy)
        params = list(model.parameters())
        assert _state_missing(opt, params) is expected
    del opt.state[params[0]]  # Adam's state for one parameter gone
    assert _state_missing(opt, params)


@cuda
@pytest.mark.parametrize("base", ["plain", "momentum", "adam"])
def test_replayed_steps_equal_eager_steps(base):
    make = {"plain": lambda ps: torch.optim.SGD(ps, lr=0.05),
            "momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
            "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, capturable=True)}[base]
    eager_model = mlp().cuda()
    graphed_model = copy.deepcopy(eager_model)
    eager = Backforward(eager_model, make(eager_model.parameters()))
    graphed = Backforward(graphed_model, make(graphed_model.parameters()))
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randn(16, 20, device="cuda", generator=g), torch.randint(0, 5, (16,), device="cuda",
                                                                                 generator=g)) for _ in range(6)]
    eager.step_batch(*batches[0], F.cross_entropy)
    graphed.step_batch(*batches[0], F.cross_entropy)
    step = CapturedStep(graphed, *batches[0], F.cross_entropy)
    for x, y in batches[1:]:
        eager_loss = eager.step_batch(x, y, F.cross_entropy)
        graphed_loss = step(x, y)
        torch.testing.assert_close(graphed_loss, eager_loss)
    for p, q in zip(eager_model.parameters(), graphed_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    for b, c in zip(eager_model.buffers(), graphed_model.buffers(), strict=True):
        torch.testing.assert_close(b, c)


@cuda
def test_dropout_and_other_shapes_are_refused():
    model = mlp(dropout=0.2).cuda()
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(8, 20, device="cuda"), torch.randint(0, 5, (8,), device="cuda")
    opt.step_batch(x, y, F.cross_entropy)
    with pytest.raises(ValueError, match="draws random numbers"):
        CapturedStep(opt, x, y, F.cross_entropy)
    model.eval()  # no dropout: now it can be captured, and only for these shapes
    step = CapturedStep(opt, x, y, F.cross_entropy)
    with pytest.raises(ValueError, match="captured for inputs of shape"):
        step(torch.randn(4, 20, device="cuda"), y[:4])
