import copy

import pytest
import torch
from torch import nn

torch.set_num_threads(1)  # small tensors: threads only add noise on a 2-core machine
TORCH_BACKWARD = torch.autograd.backward  # torch's own, before any step ran


@pytest.fixture(autouse=True)
def torch_backward_left_as_it_was():
    """No test leaves torch.autograd.backward patched (a step routes it only while a pass runs); a patch the test
    made itself with monkeypatch is undone before this looks."""
    assert torch.autograd.backward is TORCH_BACKWARD
    yield
    assert torch.autograd.backward is TORCH_BACKWARD, "torch.autograd.backward was left patched"


class Reordered(nn.Module):
    """Registers its layers in the opposite order to the one it calls them in."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.mid = nn.Linear(5, 6)
        self.stem = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.relu(self.stem(x)))))


class Residual(nn.Module):
    """x -> stem -> x + block(x) -> head: not a chain of stages."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(h + self.block(h))


class Traced(nn.Module):
    """A model with its own forward around an nn.Sequential: step_batch must trace it (no chain)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class Routed(nn.Module):
    """Sends a batch of positive sum through ``first``, any other through ``second``: a module whose stages' data
    flow depends on the batch (a router)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.first, self.second = nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.first(x) if x.sum() > 0 else self.second(x)


def linear_stages(model: nn.Module) -> list[list[nn.Parameter]]:
    """Stages written out by hand: each Linear/Conv/BatchNorm in the order the forward pass calls it."""
    return [list(m.parameters(recurse=False)) for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm1d)) and list(m.parameters(recurse=False))]


def make(name: str) -> tuple[nn.Module, list[list[nn.Parameter]], torch.Tensor, torch.Tensor]:
    """A model, its stages in call order (by hand), and a batch."""
    torch.manual_seed(0)
    x4, y3 = torch.randn(8, 4), torch.randint(0, 3, (8,))
    if name == "mlp3":
        m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        return m, linear_stages(m), x4, y3
    if name == "batchnorm":
        m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5),
                          nn.ReLU(), nn.Linear(5, 3))
        return m, linear_stages(m), x4, y3
    if name == "dropout":
        m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.ReLU(),
                          nn.Dropout(0.3), nn.Linear(8, 3))
        return m, linear_stages(m), x4, y3
    if name == "cnn":
        m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
        return m, linear_stages(m), torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    if name == "reordered":
        m = Reordered()
        return m, [list(m.stem.parameters()), list(m.mid.parameters()), list(m.head.parameters())], x4, y3
    if name == "residual":
        m = Residual()
        return m, [list(m.stem.parameters()), list(m.block[0].parameters()), list(m.block[2].parameters()),
                   list(m.head.parameters())], x4, y3
    raise KeyError(name)


BASES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.3),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.02),
}


def clone(model: nn.Module, stages: list[list[nn.Parameter]]):
    """A deep copy of the model and the matching stages in it."""
    twin = copy.deepcopy(model)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    params = list(twin.parameters())
    return twin, [[params[index[id(p)]] for p in s] for s in stages]


def assert_same_params(a: nn.Module, b: nn.Module, atol: float = 0.0, rtol: float = 0.0) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    for (name, p), q in zip(a.named_buffers(), b.buffers(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol, msg=lambda m, n=name: f"buffer {n}: {m}")


@pytest.fixture
def ce():
    return nn.functional.cross_entropy


def activation_penalty(_module, inputs, _output):
    """A forward hook that calls backward() on a penalty of its module's input, as activation penalties do."""
    if torch.is_grad_enabled() and inputs[0].requires_grad:
        (1e-2 * inputs[0].pow(2).mean()).backward(retain_graph=True)


def penalised_mlp_beside_reference(order: str):
    """A float64 MLP whose middle layer's hook backpropagates a penalty in every forward, its twin for
    reference_step with the stages in update order, their SGD optimizers, and a batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[2].register_forward_hook(activation_penalty)
    ref, ref_stages = clone(model, [list(model[i].parameters()) for i in (0, 2, 4)])
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    return model, ref, ref_stages[::-1] if order == "reverse" else ref_stages, ref_opt, x, y
