"""The graph engine on models with their own forward: what each pass recomputes, what it keeps, when it refuses.

Exactness on the models researchers train is in test_awkward_models.py (every case that traces runs there).
"""

import warnings

import pytest
import torch
from conftest import assert_same_params, clone
from torch import nn

from backforward import Backforward, reference_step

F = nn.functional
CALLS: list[str] = []


class Counted(nn.Linear):
    """A Linear that notes its name each time it runs (no hooks: hooks would change how the model is traced)."""

    def __init__(self, name: str, n_in: int, n_out: int):
        super().__init__(n_in, n_out)
        self.label = name

    def forward(self, x):
        CALLS.append(self.label)
        return super().forward(x)


class SideBranch(nn.Module):
    """stem -> a -> b with a skip around a and b, times a side branch of the input, then the head."""

    def __init__(self):
        super().__init__()
        self.stem, self.side = Counted("stem", 4, 6), Counted("side", 4, 6)
        self.a, self.b, self.head = Counted("a", 6, 6), Counted("b", 6, 6), Counted("head", 6, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        s = self.side(x)
        h = h + self.b(torch.tanh(self.a(h)))
        return self.head(h * s)


def backward(loss):
    loss.backward()
    return loss


def passes(calls: list[str]) -> list[list[str]]:
    """Split the calls of one step at the head, which every pass runs last."""
    out, current = [], []
    for name in calls:
        current.append(name)
        if name == "head":
            out.append(current)
            current = []
    return out


class BesideReference:
    """The model stepped by step_batch beside a copy stepped by reference_step, on the stages named."""

    def __init__(self, model: nn.Module, names: list[str], momentum: float = 0.0):
        self.model = model
        stages = [list(model.get_submodule(n).parameters()) for n in names]
        self.ref, self.ref_stages = clone(model, stages)
        self.ref_opt = torch.optim.SGD(self.ref.parameters(), lr=0.1, momentum=momentum)
        self.bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum))

    def step(self, x, y, seed: int = 0) -> None:
        torch.manual_seed(seed)
        reference_step(self.ref, self.ref_opt, self.ref_stages, lambda: backward(F.cross_entropy(self.ref(x), y)))
        torch.manual_seed(seed)
        self.bf.step_batch(x, y, F.cross_entropy)
        assert_same_params(self.model, self.ref)


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_each_pass_recomputes_what_depends_on_the_moved_stage_or_its_own(order):
    torch.manual_seed(0)
    model = SideBranch()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), order=order)
    bf.step_batch(x, y, F.cross_entropy)  # the generic engine finds the data-flow order
    bf.step_batch(x, y, F.cross_entropy)  # traces, checks the graph against forward()
    assert bf.stage_names == ["stem", "side", "a", "b", "head"]  # side runs before a in forward
    CALLS.clear()
    bf.step_batch(x, y, F.cross_entropy)
    assert bf._engine == "graph"
    if order == "forward":
        # pass k recomputes what depends on stage k-1 (moved) or on stage k; side depends on the input alone
        assert passes(CALLS) == [["stem", "side", "a", "b", "head"],   # stage stem: everything
                                 ["stem", "side", "a", "b", "head"],   # side; stem moved
                                 ["side", "a", "b", "head"],           # a; side moved: h and s are kept
                                 ["a", "b", "head"],                   # b; a moved
                                 ["b", "head"]]                        # head; b moved
    else:
        assert passes(CALLS) == [["stem", "side", "a", "b", "head"],   # stage head: everything
                                 ["b", "head"],                        # b; head moved
                                 ["a", "b", "head"],                   # a; b moved
                                 ["side", "a", "b", "head"],           # side; a moved: h is kept
                                 ["stem", "side", "a", "b", "head"]]   # stem; side moved


def test_graph_engine_step_equals_reference_and_keeps_nothing_after_the_step():
    torch.manual_seed(1)
    model = SideBranch()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["stem", "side", "a", "b", "head"], momentum=0.9)
    held = []
    for _ in range(4):
        twins.step(x, y)
        held.append(twins.bf._held_between_passes())
    assert twins.bf._engine == "graph"
    assert held == [[]] * 4


def test_kept_values_are_counted_while_the_step_runs():
    torch.manual_seed(2)
    model = SideBranch()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    seen = []
    model.head.register_forward_hook(lambda *_: seen.append([tuple(t.shape) for t in bf._held_between_passes()]))
    for _ in range(3):
        bf.step_batch(x, y, F.cross_entropy)
    # The graph engine's step, at each pass's head: pass 2 keeps h = tanh(stem(x)) for pass 3; pass 3 keeps
    # s = side(x) for pass 4; pass 4 keeps tanh(a(h)) for pass 5, which reads all three for the last time.
    assert bf._engine == "graph"
    assert [len(held) for held in seen[-5:]] == [0, 1, 2, 3, 0]
    assert all(shape == (5, 6) for held in seen[-5:] for shape in held)


class Untraceable(nn.Module):
    """Where a traced graph would not compute forward(): each variant must fall back, saying why."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.l1(x)
        if self.kind == "no_grad":
            with torch.no_grad():
                h = h * 2
        elif self.kind == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = torch.tanh(h)
        elif self.kind == "random":
            h = h + torch.rand(6)  # drawn at trace time: the same numbers in every call
        elif self.kind == "isinstance" and not isinstance(h, torch.Tensor):
            h = h * 0  # tracing sees a Proxy and takes this branch; forward() never does
        elif self.kind == "control flow" and h.sum() > 0:
            h = -h
        return self.l2(torch.tanh(h))


@pytest.mark.parametrize("kind, reason", [("no_grad", "grad mode"), ("autocast", "autocast"),
                                          ("random", "random numbers"),
                                          ("isinstance", "does not compute what forward() computes"),
                                          ("control flow", "cannot trace"), ("hook", "hooks")])
def test_untraceable_models_fall_back_to_the_generic_engine_saying_why_once(kind, reason):
    torch.manual_seed(3)
    model = Untraceable(kind)
    if kind == "hook":
        model.register_forward_hook(lambda m, a, out: out * 1.0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["l1", "l2"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(3):
            twins.step(x, y, seed=t)
    said = [str(w.message) for w in caught]
    assert twins.bf._engine == "generic"
    assert len(said) == 1 and reason in said[0] and "\n" not in said[0], said
    assert caught[0].filename == __file__  # it points at the caller's step_batch


class ModeBranch(nn.Module):
    """A Python branch on self.training inside a traced-through module: tracing fixes it, so a mode change
    must trace again."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l2(h * 2 if self.training else h)


def test_a_mode_change_traces_again():
    torch.manual_seed(4)
    model = ModeBranch()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["l1", "l2"])
    for mode in (True, True, False, False, True):
        model.train(mode)
        twins.ref.train(mode)
        twins.step(x, y)
    assert twins.bf._engine == "graph" and len(twins.bf._graphs) == 2


def test_a_value_modified_in_place_is_recomputed_not_kept():
    """``out += skip`` modifies a value some passes read from an earlier one: the step that finds it
    recomputes everything, and later steps recompute the value instead of keeping it."""

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.skip, self.head = (nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6),
                                                       nn.Linear(6, 3))

        def forward(self, x):
            h = torch.tanh(self.stem(x))
            out = self.a(h)
            out += self.skip(h)  # skip runs after a: a pass updating skip reads a's output and modifies it
            return self.head(out)

    torch.manual_seed(5)
    model = InPlace()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["stem", "a", "skip", "head"])
    for _ in range(4):
        twins.step(x, y)
    graph = next(iter(twins.bf._graphs.values()))
    assert [graph.ops[i].name for i in graph.volatile] == ["a"]
