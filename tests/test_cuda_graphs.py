"""Whole-step CUDA graphs: exact against eager steps where a GPU is present; clear refusals everywhere."""

import copy

import pytest
import torch
from torch import nn

from backforward import Backforward, CapturedStep
from backforward.cuda_graphs import _state_layout

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


def test_the_state_layout_changes_when_state_is_created_or_replaced_not_when_changed_in_place():
    # A captured step must find the base optimizer's state made and change it in place: else every replay would
    # make it afresh (momentum SGD's buffer a copy of the gradient, Adam's first step each time).
    model = mlp()
    params = list(model.parameters())
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    for make in (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.Adam(ps, lr=1e-3),
                 lambda ps: torch.optim.SGD(ps, lr=0.1)):
        opt = Backforward(model, make(model.parameters()))
        before = _state_layout(opt, params)
        opt.step_batch(x, y, F.cross_entropy)
        made = _state_layout(opt, params)
        assert (made != before) is bool(opt.state)  # plain SGD keeps no state: nothing to make
        opt.step_batch(x, y, F.cross_entropy)
        assert _state_layout(opt, params) == made
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    opt.step_batch(x, y, F.cross_entropy)
    made = _state_layout(opt, params)
    opt.state[params[0]]["momentum_buffer"] = opt.state[params[0]]["momentum_buffer"].clone()
    assert _state_layout(opt, params) != made


@cuda
def test_an_optimizer_whose_state_the_capture_would_create_is_refused_and_left_as_it_was():
    # Named stages are ordered before any step: only the capture itself shows that Adam's state is not there yet.
    model = mlp().cuda()
    opt = Backforward(model, torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True),
                      stages=[[p] for p in model.parameters()])
    x, y = torch.randn(8, 20, device="cuda"), torch.randint(0, 5, (8,), device="cuda")
    with pytest.raises(ValueError, match="created or replaced its state inside the capture"):
        CapturedStep(opt, x, y, F.cross_entropy)
    assert len(opt.state) == 0


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
        assert torch.equal(graphed_loss, eager_loss)  # the same kernels on the same values: bit for bit
    for p, q in zip(eager_model.parameters(), graphed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for key, value in eager.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(graphed.state_dict()["state"][key][name]))
    for b, c in zip(eager_model.buffers(), graphed_model.buffers(), strict=True):
        assert torch.equal(b, c)


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
