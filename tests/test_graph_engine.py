"""The graph engine on models with their own forward: what each pass recomputes, what it keeps, when it refuses.

Exactness on the models researchers train is in test_awkward_models.py (every case that traces runs there).
"""

import array
import collections
import contextlib
import copy
import dataclasses
import decimal
import enum
import fractions
import functools
import gc
import operator
import re
import threading
import time
import types
import warnings
import weakref

import numpy as np
import pytest
import torch
from awkward import RoundedThrough
from conftest import Routed, Traced, activation_penalty, assert_same_params, clone, penalised_mlp_beside_reference
from torch import full as full_of  # a factory imported by name (CausalSelfAttention)
from torch import nn
from torch.utils.checkpoint import checkpoint

from backforward import Backforward, reference_step
from backforward.graph import CONSTANT_CHANGED, Refusal, model_graph, recompute_sets, settings_of
from backforward.stages import Stage

F = nn.functional
CALLS: list[str] = []
ONES = torch.ones
TOTAL = torch.zeros(5, 6)  # ChangesUnseen("constant") adds into it
APPLY = vars(torch.autograd.Function)["apply"].__func__


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

    def __init__(self, model: nn.Module, names: list[str], momentum: float = 0.0, explicit: bool = False):
        self.model = model
        stages = [list(model.get_submodule(n).parameters()) for n in names]
        self.ref, self.ref_stages = clone(model, stages)
        self.ref_opt = torch.optim.SGD(self.ref.parameters(), lr=0.1, momentum=momentum)
        self.bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum),
                              stages=stages if explicit else None)  # explicit: the order is not read

    def step(self, x, y, seed: int = 0) -> None:
        torch.manual_seed(seed)
        reference_step(self.ref, self.ref_opt, self.ref_stages, lambda: backward(F.cross_entropy(self.ref(x), y)))
        torch.manual_seed(seed)
        self.bf.step_batch(x, y, F.cross_entropy)
        assert_same_params(self.model, self.ref)


def steps_on_the_graph_engine(twins: BesideReference, x, y, steps: int = 3) -> None:
    """Steps the twins (equal to the reference every step); the last step ran on the graph engine."""
    for t in range(steps):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "graph"


def fallback_warnings(twins: BesideReference, x, y, steps: int = 2, context=None) -> list[str]:
    """Steps the twins (equal to the reference every step) on the generic engine; backforward's warnings."""
    with warnings.catch_warnings(record=True) as caught, context or contextlib.nullcontext():
        warnings.simplefilter("always")
        for t in range(steps):
            twins.step(x, y, seed=t)
    assert twins.bf._engine == "generic"
    return [str(w.message) for w in caught]


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
    assert bf._held_between_passes() == []  # before any step
    seen = []
    model.head.register_forward_hook(lambda *_: seen.append([tuple(t.shape) for t in bf._held_between_passes()]))
    for _ in range(3):
        bf.step_batch(x, y, F.cross_entropy)
    # The graph engine's step, at each pass's head: pass 2 keeps h = tanh(stem(x)) for pass 3; pass 3 keeps
    # s = side(x) for pass 4; pass 4 keeps tanh(a(h)) for pass 5, which reads all three for the last time.
    assert bf._engine == "graph"
    assert [len(held) for held in seen[-5:]] == [0, 1, 2, 3, 0]
    assert all(shape == (5, 6) for held in seen[-5:] for shape in held)


def test_kept_values_read_while_the_base_optimizer_steps_leave_the_plan_alone():
    """The base optimizer holds one stage's parameters while it steps: reading what is kept then must not
    find the stages again (with explicit stages, one would be 'not held')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    bf = Backforward(model, base, stages=[model[0], model[2]])
    seen = []
    base.register_step_post_hook(lambda *_: seen.append(len(bf._held_between_passes())))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for _ in range(3):
        bf.step_batch(x, y, F.cross_entropy)
    assert bf._engine == "chain" and len(seen) == 6


class ReadsTheBatchLate(nn.Module):
    """The last stage reads a view of the batch (same storage): kept between passes, but the batch's own."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(4, 3)

    def forward(self, x):
        v = x.flatten(1)
        return self.b(torch.tanh(self.a(v))) + self.c(v)


def test_views_of_the_batch_are_not_counted_as_kept_values():
    torch.manual_seed(2)
    model = ReadsTheBatchLate()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    seen = []
    for name in "abc":
        getattr(model, name).register_forward_hook(
            lambda *_, name=name: seen.append((name, [tuple(t.shape) for t in bf._held_between_passes()])))
    for _ in range(3):
        bf.step_batch(x, y, F.cross_entropy)
    assert bf._engine == "graph"
    # The last step: pass 1 runs a, b, c; pass 2 runs a, b and c again (c's output, read by an addition that
    # saves nothing for backward, would hold memory a plain step does not) and keeps tanh(a(v)) for pass 3,
    # which runs b and c. v, a view of the batch kept for c, is the batch's memory, not the engine's.
    assert seen[-8:] == [("a", []), ("b", []), ("c", []), ("a", []), ("b", [(5, 6)]), ("c", [(5, 6)]), ("b", []),
                         ("c", [])]


class Masks(nn.Module):
    """Masks combined by functions whose names end in "_" but that return a new value, on masks other
    operations read too: ``a & b`` and ``a | b`` (operator.and_, operator.or_), or torch._VF.__and__ and
    __or__ (recorded as function calls whose names start and end with "_", as a dunder's do)."""

    def __init__(self, and_=operator.and_, or_=operator.or_):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.and_, self.or_ = and_, or_

    def forward(self, x):
        h = self.a(x)
        positive, small = h > 0, h.abs() < 1
        both, either = self.and_(positive, small), self.or_(positive, small)
        return self.b(h * both + h * either + h * positive + h * small)


@pytest.mark.parametrize("and_, or_", [(operator.and_, operator.or_), (torch._VF.__and__, torch._VF.__or__)],
                         ids=["operators", "dunders"])
def test_and_and_or_of_values_others_read_stay_on_the_graph_engine(and_, or_):
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    engines = twin_steps(Masks(and_, or_).double(), F.cross_entropy, x, y, steps=3, quiet=False)
    assert engines == ["generic", "graph", "graph"]


IN_PLACE = {
    "private function": lambda m, h: torch._index_put_impl_(h, (torch.tensor([0]),),
                                                             torch.tensor(0.5, dtype=h.dtype), False, False),
    "list argument": lambda m, h: torch._foreach_mul_([h], 3.0),
    "__setitem__ called": lambda m, h: h.__setitem__((slice(None), 0), 5.0),
    "through a view": lambda m, h: h[:, :2].mul_(3.0),
    "through a view of a view": lambda m, h: h.view(-1).view(5, 6).transpose(0, 1).add_(1.0),
    "through a parameter-free module": lambda m, h: m.same(h).mul_(3.0),
    "through a call torch has no schema for": lambda m, h: h.double().mul_(3.0),  # h is float64: itself
}


class ChangesInPlace(nn.Module):
    """An in-place change to a value another op reads too, in one of the ways of IN_PLACE: which value that op
    sees depends on when it runs, which a graph of values does not record."""

    def __init__(self, kind):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)
        self.same = nn.Identity()
        self.change = IN_PLACE[kind]

    def forward(self, x):
        h = self.a(x)
        y = self.b(h * 2.0)  # reads h before the change
        self.change(self, h)
        return self.c(h) + y


@pytest.mark.parametrize("kind", list(IN_PLACE))
def test_an_in_place_change_to_a_value_others_read_is_refused_however_it_is_made(kind):
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engines = twin_steps(ChangesInPlace(kind).double(), F.cross_entropy, x, y, steps=3, quiet=False)
    assert engines == ["generic"] * 3  # and equal to step(closure) after every step (twin_steps)
    assert any("in place" in str(w.message) for w in caught)


def test_values_a_module_or_an_op_makes_afresh_may_be_changed_in_place():
    """The refusal follows views only: a value a module with parameters or a computing op made is new memory,
    so changing it in place when nothing else reads it keeps the graph engine (ResNet's ``out += identity``)."""

    class Fresh(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.skip = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x).mul_(0.5)  # a's output, new memory, though x is read by skip too
            g, k = h.mul(2.0), torch.add(h, 1.0)  # both read h; both new memory (a method, a function)
            g, k = g.mul_(3.0), k.add_(1.0)
            return self.b(g + k) + self.skip(x)

    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert twin_steps(Fresh().double(), F.cross_entropy, x, y, steps=3, quiet=False) == ["generic", "graph", "graph"]


class Untraceable(nn.Module):
    """Where a traced graph would not compute forward(): each variant must fall back, saying why."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, mask=None):
        h = self.l1(x)
        if self.kind == "default" and mask is not None:  # tracing sees a Proxy and multiplies by None
            h = h * mask
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
                                          ("control flow", "cannot trace"), ("hook", "hooks"),
                                          ("default", "its traced graph fails on the first batch (TypeError: "
                                                      "unsupported operand type(s) for *: 'Tensor' and 'NoneType'), "
                                                      "where forward() does not")])
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


def test_the_fallback_warning_points_at_the_first_frame_outside_the_library(monkeypatch):
    """Where the warning points, as a property of the stack when it is raised: every frame up to the one it
    names is the library's (or torch.optim's, which calls the step), that one is not. (Unlike the test below,
    this holds under mutation testing too, whose tool puts frames of its own between the library's functions.)"""
    import os
    import sys

    import backforward.optimizer

    raised = []
    real = warnings.warn

    def recording(message, category=None, stacklevel=1, **kwargs):
        if str(message).startswith("backforward:"):
            frame, files = sys._getframe(1), []
            while frame is not None:
                files.append(frame.f_code.co_filename)
                frame = frame.f_back
            raised.append((stacklevel, files))
        return real(message, category, stacklevel + 1, **kwargs)

    monkeypatch.setattr(warnings, "warn", recording)
    model = Untraceable("control flow")
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    # Called from a file in a folder whose name starts as the package's does (not the package).
    path = os.path.dirname(backforward.optimizer.__file__) + "_examples/train.py"
    namespace: dict = {}
    exec(compile("def train(bf, x, y, loss_fn):\n    bf.step_batch(x, y, loss_fn)\n", path, "exec"), namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        namespace["train"](bf, torch.randn(5, 4), torch.randint(0, 3, (5,)), F.cross_entropy)
    (level, files), = raised
    inside = tuple(os.path.join(os.path.dirname(path), "") for path in (backforward.optimizer.__file__,
                                                                       torch.optim.__file__))
    assert all(f.startswith(inside) for f in files[:level - 1]) and not files[level - 1].startswith(inside)


def test_the_fallback_warning_points_at_a_caller_in_a_folder_named_like_the_package():
    """A user's ``backforward_examples/train.py`` beside the package is not the package (a prefix of a path is
    not its folder). Left out of the mutation run, as the test below."""
    import os

    import backforward

    path = os.path.dirname(backforward.__file__) + "_examples/train.py"
    namespace: dict = {}
    exec(compile("def train(bf, x, y, loss_fn):\n    bf.step_batch(x, y, loss_fn)\n", path, "exec"), namespace)
    model = Untraceable("control flow")
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace["train"](bf, torch.randn(5, 4), torch.randint(0, 3, (5,)), F.cross_entropy)
    assert [(w.filename, w.lineno) for w in caught] == [(path, 2)]


def test_the_fallback_warning_points_at_the_callers_step_batch():
    # Apart from the test above: under mutation testing (mutmut) the library's calls pass through
    # frames of the tool, so the mutation run leaves this one out (see pyproject's [tool.mutmut]).
    torch.manual_seed(3)
    model = Untraceable("control flow")
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            bf.step_batch(x, y, F.cross_entropy)
    assert len(caught) == 1 and caught[0].filename == __file__


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
    engines = []
    for mode in (True, True, False, False, True, True):
        model.train(mode)
        twins.ref.train(mode)
        twins.step(x, y)
        engines.append(twins.bf._engine)
    # After each change the generic engine reads the stage order again (branches may reorder stages).
    assert engines == ["generic", "graph", "generic", "graph", "generic", "graph"]
    assert len(twins.bf._graphs) == 2


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


# ---- what a traced graph must not get wrong (found by an adversarial review) ----

class SharedInplace(nn.Module):
    """h.relu_() changes h while the skip also reads it: the order in time matters."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        h.relu_()
        g = self.b(h)
        g += h
        return self.c(g)


class Settable(nn.Module):
    """Branches on plain attributes a schedule may change between steps."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.use_skip, self.temperature, self.swap = True, 1.0, False

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        first, second = (self.b, self.a) if self.swap else (self.a, self.b)
        g = second(torch.tanh(first(h)))
        if self.use_skip:
            g = g + h
        return self.out(torch.tanh(g)) / self.temperature


class PenaltyInForward(nn.Module):
    """Returns a weight penalty computed by iterating self.parameters() (real tensors while tracing)."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.a(x))), sum(p.pow(2).sum() for p in self.parameters())


def twin_steps(model, loss_fn, x, y, change=lambda m, t: None, steps=4, quiet=True, **kwargs):
    """step_batch on the model, step(closure) on a copy; both must agree after every step."""

    twin = copy.deepcopy(model)
    fast = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5), **kwargs)
    slow = Backforward(twin, torch.optim.SGD(twin.parameters(), lr=0.3, momentum=0.5), **kwargs)
    engines = []
    for t in range(steps):
        change(model, t)
        change(twin, t)
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            fast.step_batch(x.clone(), y, loss_fn)
        slow.step(lambda: backward(loss_fn(twin(x.clone()), y)))
        engines.append(fast._engine)
        assert fast.last_losses == pytest.approx(slow.last_losses, abs=1e-12), t
        assert fast.stage_names == slow.stage_names, t
        assert_same_params(model, twin)
    return engines


def test_an_inplace_change_to_a_value_others_read_runs_the_generic_engine():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert twin_steps(SharedInplace().double(), F.cross_entropy, x, y, quiet=False) == ["generic"] * 4
    assert any("changes a in place while other operations read it" in str(w.message) for w in caught)


def test_tracing_leaves_the_batch_alone():
    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            x.mul_(2)
            return self.c(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Doubling().double()
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for _ in range(2):
        batch = x.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step_batch(batch, y, F.cross_entropy)
        assert torch.equal(batch, 2 * x)  # one forward's worth, as in a plain step


def test_changed_attributes_and_orders_are_traced_and_read_again():
    def schedule(m, t):
        m.use_skip, m.temperature, m.swap = t < 2, 1.0 if t < 2 else 2.0, t >= 4

    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    engines = twin_steps(Settable().double(), F.cross_entropy, x, y, schedule, steps=6)
    assert "graph" in engines  # fast where the graph is known, generic where it was read again


def test_values_computed_from_parameters_outside_the_traced_calls_are_refused():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))

    def loss_fn(out, target):
        return F.cross_entropy(out[0], target) + 1e-2 * out[1]

    assert twin_steps(PenaltyInForward().double(), loss_fn, x, y) == ["generic"] * 4


def test_an_input_that_requires_grad_gets_every_pass_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    ref, stages = clone(model, [list(model[0].parameters()), list(model[2].parameters())])
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for _ in range(3):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        opt.step_batch(a, y, F.cross_entropy)
        reference_step(ref, ref_opt, stages, lambda b=b: backward(F.cross_entropy(ref(b), y)))
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)  # summed over both passes, as defined


def test_step_batch_with_a_grad_scaler_scales_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    twin = clone(model, [])[0]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaled = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), grad_scaler=scaler)
    plain = Backforward(twin, torch.optim.SGD(twin.parameters(), lr=0.1))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for _ in range(3):  # scaling by a power of two and back is exact
        scaled.step_batch(x, y, F.cross_entropy)
        scaler.update()
        plain.step_batch(x, y, F.cross_entropy)
        assert scaled.last_losses == plain.last_losses
    assert_same_params(model, twin)


def test_a_model_returning_a_dict_runs_on_the_graph_engine():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return {"logits": self.b(torch.tanh(self.a(x)))}

    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    engines = twin_steps(Named().double(), lambda out, t: F.cross_entropy(out["logits"], t), x, y, steps=3)
    assert engines == ["generic", "graph", "graph"]


def test_a_dict_inside_a_tuple_output_is_a_plain_dict_the_loss_may_change():
    """(logits, {"aux": h}): the loss function pops the dict, as it may with what forward() returns."""
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h), {"aux": h}

    def loss_fn(out, t):
        logits, extra = out
        return F.cross_entropy(logits, t) + 0.1 * extra.pop("aux").pow(2).mean()

    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert twin_steps(WithAux().double(), loss_fn, x, y, steps=3) == ["generic", "graph", "graph"]


class MethodKeywords(nn.Module):
    """Tensor methods called with keywords (``softmax(dim=...)``, ``sum(dim=..., keepdim=...)``) between stages."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.l1(x).softmax(dim=0)
        return self.l2(h - h.sum(dim=1, keepdim=True) / 6)


def test_tensor_methods_called_with_keywords_run_on_the_graph_engine():
    torch.manual_seed(5)
    model = MethodKeywords()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["l1", "l2"])
    steps_on_the_graph_engine(twins, x, y)


class Checking(nn.Module):
    """Checks its input's type and raises a bare TypeError, as tracing's stand-in for the input makes it."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError
        return self.l2(torch.tanh(self.l1(x)))


@pytest.mark.parametrize("model, why", [
    (Untraceable("control flow"), "symbolically traced variables cannot be used as inputs to control flow"),
    (Checking(), "TypeError"),
], ids=["message", "no-message"])
def test_a_model_fx_cannot_trace_is_refused_with_the_first_line_of_what_fx_said(model, why):
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bf.step_batch(x, y, F.cross_entropy)
    assert [str(w.message) for w in caught] == [
        f"backforward: step_batch runs the generic engine on {type(model).__name__}: torch.fx cannot trace it: {why}"]


# ---- found by mutation testing (scripts/mutation.sh) ----

def test_an_input_that_requires_grad_gets_every_pass_gradient_with_three_stages():
    # With three stages the last pass of a fast engine would not reach the input: every pass must.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    ref, stages = clone(model, [list(model[i].parameters()) for i in (0, 2, 4)])
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for _ in range(3):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        opt.step_batch(a, y, F.cross_entropy)
        reference_step(ref, ref_opt, stages, lambda b=b: backward(F.cross_entropy(ref(b), y)))
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert_same_params(model, ref)


class Block(nn.Module):
    """A plain container of the user's (traced through until it has hooks of its own)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class WithBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Linear(4, 6), Block(), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.block(torch.tanh(self.stem(x))))


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_a_container_with_a_hook_of_its_own_is_called_whole(kind):
    """A hook (here one that reads a value on the host, which tracing could not record) on a container that
    owns no parameters itself: the graph calls the container whole, so the hook runs each time it is called."""
    torch.manual_seed(0)
    model = WithBlock().double()
    seen = []
    if kind == "forward":
        model.block.register_forward_hook(lambda _m, _a, out: seen.append(float(out.detach().sum())))
    else:
        model.block.register_forward_pre_hook(lambda _m, args: seen.append(float(args[0].detach().sum())))
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    engines = twin_steps(model, F.cross_entropy, x, y, steps=3, quiet=False)
    assert engines == ["generic", "graph", "graph"] and seen


@pytest.mark.parametrize("where", ["root", "block", "global"])
def test_hooks_added_after_the_graph_was_read_take_effect(where):
    """A hook that doubles an output, added after two fast steps: every later pass must run it, as the
    reference's plain forward does."""
    from torch.nn.modules import module as nn_module

    torch.manual_seed(0)
    model = WithBlock().double()
    names = ["stem", "block.lin", "head"]
    ref, stages = clone(model, [list(model.get_submodule(n).parameters()) for n in names])
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    handles = []
    try:
        for t in range(4):
            if t == 2:
                for target in (model.block, ref.block) if where == "block" else (model, ref):
                    def double(module, _args, out, target=target):
                        return out * 2 if module is target else None

                    handles.append(nn_module.register_module_forward_hook(double) if where == "global"
                                   else target.register_forward_hook(double))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step_batch(x, y, F.cross_entropy)
            reference_step(ref, ref_opt, stages, lambda: backward(F.cross_entropy(ref(x), y)))
            assert_same_params(model, ref)
            if t == 1:
                assert opt._engine == "graph"
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_a_hook_added_to_a_sequential_after_its_chain_was_read_takes_effect(kind):
    """A forward (or forward pre-) hook on the root of a plain nn.Sequential, alone, after fast steps: the
    chain engine would call the children and skip it, so every later step runs the hook, as the reference's
    plain forward does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    ref, stages = clone(model, [list(model[i].parameters()) for i in (0, 2)])
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for t in range(4):
        if t == 2:
            for m in (model, ref):
                if kind == "forward":
                    m.register_forward_hook(lambda _m, _a, out: out * 2)
                else:
                    m.register_forward_pre_hook(lambda _m, args: (args[0] * 2,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step_batch(x, y, F.cross_entropy)
        reference_step(ref, ref_opt, stages, lambda: backward(F.cross_entropy(ref(x), y)))
        assert_same_params(model, ref)
        if t > 0:  # the first step reads the stage order from a whole pass
            assert opt._engine == ("chain" if t == 1 else "generic")


class SwappableActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.act, self.head = nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.act(self.stem(x)))


def test_a_submodule_replaced_after_the_graph_was_read_is_the_one_that_runs():
    """Tanh swapped for Sigmoid (same plain attributes) after fast steps: the model is read again."""
    torch.manual_seed(0)
    model = SwappableActivation().double()
    ref, stages = clone(model, [list(model.stem.parameters()), list(model.head.parameters())])
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for t in range(4):
        if t == 2:
            model.act, ref.act = nn.Sigmoid(), nn.Sigmoid()
        opt.step_batch(x, y, F.cross_entropy)
        reference_step(ref, ref_opt, stages, lambda: backward(F.cross_entropy(ref(x), y)))
        assert_same_params(model, ref)
        if t in (1, 3):  # the first step on a new graph reads the stage order from a whole pass
            assert opt._engine == "graph"


def test_private_and_non_plain_attributes_do_not_make_the_model_read_again():
    """Only a module's public plain attributes (flags, rates, sizes) choose its traced branches: a public list
    (unhashable) and a private counter changed every step leave the graph as it was."""
    torch.manual_seed(0)
    model = SwappableActivation().double()
    model.sizes = [4, 6, 3]
    ref, stages = clone(model, [list(model.stem.parameters()), list(model.head.parameters())])
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for t in range(4):
        model._steps_seen = t
        opt.step_batch(x, y, F.cross_entropy)
        reference_step(ref, ref_opt, stages, lambda: backward(F.cross_entropy(ref(x), y)))
        assert_same_params(model, ref)
        if t > 0:
            assert opt._engine == "graph"


def test_the_fallback_is_said_once_however_many_times_the_model_is_read_again():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for first_traceable in (False, True):
        model = Untraceable("control flow") if not first_traceable else Untraceable("none")
        opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for kind in ("none", "control flow", "isinstance", "control flow"):
                if first_traceable or kind != "none":
                    model.kind = kind  # a plain attribute: the model is read again
                opt.step_batch(x, y, F.cross_entropy)
        assert len(caught) == 1, [str(w.message) for w in caught]


class TakesABatch(nn.Module):
    """Reads its input x from a dict or a tuple between two tensors it leaves alone, and modifies x in place."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, batch):
        w, x, v = (batch["w"], batch["x"], batch["v"]) if isinstance(batch, dict) else batch
        x.mul_(2)
        return self.b(torch.tanh(self.a(x * w + v)))


@pytest.mark.parametrize("pack", [lambda x: {"w": x.abs(), "x": x, "v": x.cos()}, lambda x: (x.abs(), x, x.cos()),
                                  lambda x: [x.abs(), x, x.cos()]], ids=["dict", "tuple", "list"])
def test_tensors_inside_a_batch_are_put_back_before_every_pass(pack):
    torch.manual_seed(0)
    model = TakesABatch().double()
    ref, stages = clone(model, [list(model.a.parameters()), list(model.b.parameters())])
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.5))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step_batch(pack(x.clone()), y, F.cross_entropy)
        reference_step(ref, ref_opt, stages, lambda: backward(F.cross_entropy(ref(pack(x.clone())), y)))
        assert_same_params(model, ref)


class Shared(nn.Module):
    """a's output h is read by an addition and changed in place by another call (or one that only looks so)."""

    def __init__(self, how: str):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.how = how
        self.act = nn.ReLU(inplace=how == "module")

    def forward(self, x):
        h = self.a(x)
        g = self.b(h + 0.5)  # h + 0.5 reads h before the call below (and keeps nothing of it for backward)
        if self.how == "keyword":
            r = F.relu(h, inplace=True)
        elif self.how == "method":
            r = h.relu_()
        elif self.how == "function":
            r = torch.relu_(h)
        elif self.how == "operator":
            h += 1.0
            r = h
        elif self.how in ("module", "module, not in place"):
            r = self.act(h)
        elif self.how == "keyword False":
            r = F.relu(h, inplace=False)
        elif self.how == "dunder method":
            r = h.__mul__(2.0)  # recorded as operator.mul
        elif self.how == "reflected dunder method":
            r = torch.Tensor.__rsub__(h, 1.0)  # recorded as the method __rsub__, whose name ends with "_"
        else:
            r = torch.relu(h)
        return self.c(torch.tanh(g) + r)


@pytest.mark.parametrize("how, call", [("keyword", "relu"), ("method", "relu_"), ("function", "relu_"),
                                       ("operator", "iadd"), ("module", "act")])
def test_every_kind_of_inplace_change_to_a_value_others_read_is_refused(how, call):
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert twin_steps(Shared(how).double(), F.cross_entropy, x, y, quiet=False, steps=2) == ["generic"] * 2
    assert [str(w.message) for w in caught] == [
        f"backforward: step_batch runs the generic engine on Shared: {call} changes a in place while other "
        "operations read it too, which a graph of values cannot order"]


@pytest.mark.parametrize("how", ["keyword False", "dunder method", "reflected dunder method", "module, not in place",
                                 "plain"])
def test_calls_that_only_look_in_place_run_on_the_graph_engine(how):
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert twin_steps(Shared(how).double(), F.cross_entropy, x, y, quiet=False, steps=3) == ["generic", "graph",
                                                                                           "graph"]


class StarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, *xs):
        return self.a(xs[0])


class NeedsTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x, z):
        return self.a(x) * z


class RootHooked(nn.Sequential):
    pass


@pytest.mark.parametrize("make, why", [
    (lambda: Untraceable("no_grad"), "its forward changes grad mode, autocast or saved-tensor hooks inside "
                                     "(torch.no_grad, torch.autocast, checkpointing), which tracing would drop"),
    (lambda: Untraceable("random"), "its forward draws random numbers from no tensor input, which tracing would "
                                    "fix at one value"),
    (lambda: Untraceable("isinstance"), "its traced graph does not compute what forward() computes on the first "
                                        "batch (a Python branch that tracing fixed)"),
    (lambda: PenaltyInForward(), "its forward computes a value from parameters outside the calls tracing records "
                                 "(e.g. iterating self.parameters()), which tracing would fix at one value"),
    (lambda: StarArgs(), "its forward takes *xs; step_batch passes one input"),
    (lambda: NeedsTwo(), "its forward needs argument 'z' besides the input"),
], ids=["grad mode", "random", "branch", "parameters", "star args", "two arguments"])
def test_each_refusal_says_why_in_full(make, why):
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    loss_fn = (lambda out, t: F.cross_entropy(out[0], t)) if isinstance(model, PenaltyInForward) else F.cross_entropy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.suppress(TypeError):  # NeedsTwo cannot run on one input at all: the refusal comes first
            bf.step_batch(x, y, loss_fn)
    assert str(caught[0].message) == f"backforward: step_batch runs the generic engine on {type(model).__name__}: {why}"


@pytest.mark.parametrize("where", ["root", "global"])
def test_hooks_refuse_the_graph_saying_which(where):
    from torch.nn.modules import module as nn_module

    torch.manual_seed(0)
    model = SideBranch()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    handle = (model.register_forward_hook(lambda *_: None) if where == "root"
              else nn_module.register_module_forward_hook(lambda *_: None))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bf.step_batch(x, y, F.cross_entropy)
    finally:
        handle.remove()
    why = ("the model has forward hooks, which a graph of its calls would not fire" if where == "root" else
           "global module forward hooks are registered; a graph of calls would not fire them all")
    assert [str(w.message) for w in caught] == [f"backforward: step_batch runs the generic engine on SideBranch: {why}"]


class Defaults(nn.Module):
    """An argument with a default, a submodule's parameters used directly, a list argument, a tensor attribute
    of its own, and an output holding a number beside the logits."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(12, 3)
        self.offset = torch.zeros(3)  # a plain tensor attribute (not a buffer): it may be replaced

    def forward(self, x, scale=2.0):
        h = torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))], 1) * scale
        return {"logits": F.linear(h, self.head.weight, self.head.bias) + self.offset, "scale": scale}


def test_defaults_direct_parameters_lists_tensor_attributes_and_numbers_in_the_output_run_on_the_graph_engine():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))

    def replace_offset(m, t):
        m.offset = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64) * t  # not uniform: softmax would not see it

    engines = twin_steps(Defaults().double(), lambda out, t: F.cross_entropy(out["logits"], t), x, y,
                         change=replace_offset, quiet=False, steps=4)
    assert engines == ["generic", "graph", "graph", "graph"]


class ReadsRunningMean(nn.Module):
    """A batch norm's running mean read by attribute in a branch its call does not feed: a pass that
    recomputes the branch must recompute the call, or it reads the statistics from before the call."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.mid, self.head = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.bn(torch.tanh(self.stem(x)))
        g = torch.tanh(self.mid(x)) * self.bn.running_mean
        return self.head(h + g)


def test_a_buffer_read_by_attribute_is_recomputed_with_the_call_that_updates_it():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    engines = twin_steps(ReadsRunningMean().double(), F.cross_entropy, x, y, quiet=False, steps=4)
    assert engines[1:] == ["graph"] * 3


class TwoUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.spare1, self.spare2 = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_passes_of_stages_the_forward_does_not_use_run_whole_on_the_graph_engine():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert twin_steps(TwoUnused().double(), F.cross_entropy, x, y, quiet=False, steps=3) == ["generic", "graph",
                                                                                           "graph"]


class GradAware(nn.Module):
    """Computes differently when its input requires grad, as torch's fast paths choose kernels."""

    def forward(self, x):
        return x * 2 if x.requires_grad else x * 3


def test_kept_values_are_fed_back_with_their_requires_grad_flag():
    # Pass 3 starts at the block: it reads tanh(layer 0), kept from pass 2, which requires grad in a plain forward.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Sequential(GradAware(), nn.Linear(6, 6)), nn.Tanh(),
                          nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert twin_steps(model, F.cross_entropy, x, y, quiet=False, steps=3) == ["generic", "chain", "chain"]


class Checkpointed(nn.Module):
    """A block checkpointed without reentrance (dropout inside: its recomputation in the backward draws the same
    mask); ``how`` passes it as a module, a bound method, a lambda or a partial."""

    def __init__(self, how: str = "module", reentrant: bool = False):
        super().__init__()
        self.how, self.reentrant = how, reentrant
        self.pre = nn.Linear(4, 4)  # the checkpoint's input requires grad, as a reentrant one needs
        self.a, self.b = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.3)), nn.Linear(6, 3)

    def block(self, t, scale=1.0):
        return torch.tanh(self.a(t)) * scale

    def forward(self, x):
        fn = {"module": self.a, "method": self.block, "lambda": lambda t: self.block(t),
              "partial": functools.partial(self.block, scale=2.0)}[self.how]
        return self.b(checkpoint(fn, self.pre(x), use_reentrant=self.reentrant))


@pytest.mark.parametrize("how", ["module", "method", "lambda", "partial"])
def test_a_forward_checkpointed_without_reentrance_runs_on_the_graph_engine(how):
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    steps_on_the_graph_engine(BesideReference(Checkpointed(how), ["pre", "a", "b"]), x, y)


class Added(nn.Module):
    def forward(self, t, h):
        return torch.tanh(t + h)


def added(t, h, scale=1.0):
    return torch.tanh(t + h) * scale


class HoldsATracedValue(nn.Module):
    """Checkpoints a function holding the traced ``h`` (``how``): in a lambda's closure, in the arguments of a
    partial of a module, of a partial of a partial (the outer one's), of a partial of a function with a closure."""

    def __init__(self, how: str = "lambda"):
        super().__init__()
        self.how = how
        self.a, self.b, self.added = nn.Linear(4, 6), nn.Linear(6, 3), Added()

    def forward(self, x):
        h = self.a(x)
        scale = 2.0
        fn = {"lambda": lambda t: torch.tanh(t + h),
              "partial of a module": functools.partial(self.added, h=h),
              "partial of a partial": functools.partial(functools.partial(added, scale=2.0), h=h),
              "partial of a closure": functools.partial(lambda t, h: added(t, h, scale), h=h)}[self.how]
        return self.b(checkpoint(fn, h, use_reentrant=False))


class CallableBlock:
    """A callable object for checkpoint: what it holds is not looked into, so it is refused."""

    def __init__(self, module):
        self.module = module

    def __call__(self, t):
        return torch.tanh(self.module(t))


class ChecksACallable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(checkpoint(CallableBlock(self.a), x, use_reentrant=False))


CHECKPOINT_REFUSED = ("its forward changes grad mode, autocast or saved-tensor hooks inside (torch.no_grad, "
                      "torch.autocast, checkpointing), which tracing would drop")


@pytest.mark.parametrize("make", [*(functools.partial(HoldsATracedValue, how) for how in (
    "lambda", "partial of a module", "partial of a partial", "partial of a closure")), ChecksACallable])
def test_a_checkpoint_whose_function_holds_a_traced_value_or_is_another_callable_is_refused_saying_why(make):
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    model = make()
    assert fallback_warnings(BesideReference(model, ["a", "b"]), x, y) == [
        f"backforward: step_batch runs the generic engine on {type(model).__name__}: {CHECKPOINT_REFUSED}"]


class ClosesOverALaterName(nn.Module):
    """Checkpoints a function whose closure holds a name bound only after the call (an empty cell then)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        def block(t):
            return torch.tanh(self.a(t)) if t.dim() == 2 else later(t)  # later: not read for a batch of vectors

        h = checkpoint(block, x, use_reentrant=False)
        later = torch.relu
        return self.b(later(h))


def test_a_checkpointed_function_closing_over_a_name_not_yet_bound_runs_on_the_graph_engine():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    steps_on_the_graph_engine(BesideReference(ClosesOverALaterName(), ["a", "b"]), x, y)


class FailsAfterAFactory(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x) + full_of((x.shape[0], 6), 1.0) + torch.ones(6, device=x.device)
        h = checkpoint(self.b, h, use_reentrant=False)
        h = RoundedThrough.apply(h, 2.0)
        if h.sum() > 0:  # fx cannot trace this: tracing stops here
            h = -h
        return h


def test_tracing_that_fails_after_calls_it_recorded_whole_leaves_them_as_they_were():
    torch.manual_seed(0)
    checkpoint_before = torch.utils.checkpoint.checkpoint
    with pytest.raises(Refusal, match="cannot trace"):
        model_graph(FailsAfterAFactory(), torch.randn(5, 4))
    assert torch.ones is ONES and full_of is torch.full and checkpoint is checkpoint_before
    assert torch.utils.checkpoint.checkpoint is checkpoint_before
    assert vars(torch.autograd.Function)["apply"].__func__ is APPLY


def test_a_reentrant_checkpoint_is_refused_saying_why():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    assert fallback_warnings(BesideReference(Checkpointed(reentrant=True), ["pre", "a", "b"], explicit=True), x, y) \
        == [f"backforward: step_batch runs the generic engine on Checkpointed: {CHECKPOINT_REFUSED}"]


class CausalSelfAttention(nn.Module):
    """A GPT block as tutorials write it: the causal mask and the positions made in the forward from the
    sequence length (``torch.ones``, ``torch.arange``, and a factory imported by name), attention dropout."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.emb, self.pos = nn.Linear(3, d), nn.Embedding(16, d)
        self.qkv, self.proj, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 4)

    def forward(self, x):
        _, t, c = x.shape
        h = self.emb(x) + self.pos(torch.arange(t, device=x.device))
        q, k, v = self.qkv(h).split(h.shape[-1], dim=2)
        mask = torch.tril(torch.ones(t, t, device=x.device))
        att = (q @ k.transpose(-2, -1)).masked_fill(mask == 0, float("-inf")).softmax(-1)
        att = F.dropout(att + full_of((t, t), 0.0, dtype=x.dtype), 0.2)
        return self.head(h + self.proj(att @ v)).mean(1) + c * 0


def test_factories_given_the_traced_sequence_length_run_on_the_graph_engine():
    torch.manual_seed(0)
    x, y = torch.randn(4, 5, 3), torch.randint(0, 4, (4,))
    twins = BesideReference(CausalSelfAttention(), ["emb", "pos", "qkv", "proj", "head"])
    steps_on_the_graph_engine(twins, x, y)
    ops = [op.name for op in twins.bf._graphs[next(iter(twins.bf._graphs))].ops]
    assert {"ones", "arange", "full"} <= set(ops), ops  # each recorded as one call
    assert torch.ones is ONES and full_of is torch.full  # put back after tracing


class Quantised(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(RoundedThrough.apply(torch.tanh(self.a(x)), 4.0))


def test_a_custom_autograd_function_in_the_forward_runs_on_the_graph_engine():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    steps_on_the_graph_engine(BesideReference(Quantised(), ["a", "b"]), x, y)
    assert vars(torch.autograd.Function)["apply"].__func__ is APPLY  # put back after tracing


class DoublesInPlace(torch.autograd.Function):
    """Changes its input in place (``mark_dirty``): no name says so."""

    @staticmethod
    def forward(ctx, h):
        ctx.mark_dirty(h)
        return h.mul_(2)

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class RoundsUnderGrad(torch.autograd.Function):
    """Its forward turns grad mode back on: tracing through it would record ops autograd differentiates."""

    @staticmethod
    def forward(ctx, h):
        with torch.enable_grad():
            return torch.round(h * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return grad


ROUNDED = RoundsUnderGrad.apply  # bound before tracing, as modules do at import


class ChangesUnseen(nn.Module):
    """In-place changes no name shows (``kind``): a custom Function's ``mark_dirty`` and an ``out=`` on a value
    another op reads, an in-place sum into a tensor outside the model that the graph holds as a constant."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.c, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        g = self.a(x)  # op 1
        if self.kind == "mark_dirty":
            doubled = DoublesInPlace.apply(g)
            return self.head(self.c(g) + doubled)  # c reads g after the change, in time
        if self.kind == "mark_dirty last":
            total = g.sum(1, keepdim=True)  # reads g before the change, in time
            return self.head(self.c(DoublesInPlace.apply(g)) * total)
        if self.kind == "out":
            index = torch.zeros(x.shape[0], dtype=torch.long)
            torch.arange(x.shape[0], out=index)
            return self.head(self.c(g) + index.unsqueeze(1) * 0.1)
        total = TOTAL  # a tensor outside the model: the graph holds this one tensor, as forward() does
        total += g.detach()  # a sum of what it saw, kept outside the model
        return self.head(self.c(g))


@pytest.mark.parametrize("kind, why", [
    ("mark_dirty", "apply changes a in place while other operations read it too, which a graph of values "
                   "cannot order"),
    ("mark_dirty last", "apply changes a in place while other operations read it too, which a graph of values "
                        "cannot order"),
    ("out", "arange changes zeros in place while other operations read it too, which a graph of values cannot "
            "order")])
def test_in_place_changes_no_name_shows_are_seen_as_the_graph_is_read(kind, why):
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    said = fallback_warnings(BesideReference(ChangesUnseen(kind), ["a", "c", "head"]), x, y, steps=3)
    assert said == [f"backforward: step_batch runs the generic engine on ChangesUnseen: {why}"]


class MadeWhileTracing(nn.Module):
    """A tensor of fixed sizes made in the forward (once, while tracing: a constant of the graph) and changed in
    place through what it is or views (``how``), or held by a checkpointed function that changes it."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        if self.how == "to":
            total = torch.zeros(5, 6).to(x.device)  # the same tensor
            total += h
        elif self.how == "view":
            total = torch.zeros(30).view(x.shape[0], 6)
            total += h
        else:
            total = torch.zeros(5, 6)
            total = checkpoint(functools.partial(added_into, total), h, use_reentrant=False)
        return self.head(torch.tanh(total))


def added_into(total, h):
    return total.add_(h)


@pytest.mark.parametrize("how, why", [("to", f"iadd {CONSTANT_CHANGED}"), ("view", f"iadd {CONSTANT_CHANGED}"),
                                      ("checkpoint", CHECKPOINT_REFUSED)])
def test_a_tensor_made_while_tracing_and_changed_in_place_by_every_call_is_refused(how, why):
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    assert fallback_warnings(BesideReference(MadeWhileTracing(how), ["a", "head"]), x, y) == [
        f"backforward: step_batch runs the generic engine on MadeWhileTracing: {why}"]


def test_an_in_place_change_to_a_tensor_outside_the_model_is_refused():
    """A tensor outside the model (a module-level one) is one constant of the graph: every evaluation would change
    it, where fewer or more evaluations than forward() calls run."""
    torch.manual_seed(0)
    with pytest.raises(Refusal, match=f"^add_ {re.escape(CONSTANT_CHANGED)}$"):
        model_graph(ChangesUnseen("constant"), torch.randn(5, 4))


class MadeOfTheDefaultType(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) * (1 + torch.finfo(torch.zeros(()).dtype).eps)  # a factory's dtype, fixed while tracing


def test_a_change_of_torch_default_dtype_reads_the_model_again():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    twins = BesideReference(MadeOfTheDefaultType().double(), ["a"])
    before = torch.get_default_dtype()
    try:
        for t, dtype in enumerate((torch.float64, torch.float64, torch.float32, torch.float32)):
            torch.set_default_dtype(dtype)
            twins.step(x, y, seed=t)  # equal to the reference, which reads eps of this step's default dtype
    finally:
        torch.set_default_dtype(before)
    assert len(twins.bf._graphs) == 2


with torch.inference_mode():
    OFFSET = torch.full((6,), 0.25)  # an inference tensor: it has no version counter


class ShiftedByAnInferenceTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)) + OFFSET)


def test_an_inference_tensor_the_graph_holds_runs_on_the_graph_engine():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    steps_on_the_graph_engine(BesideReference(ShiftedByAnInferenceTensor(), ["a", "head"]), x, y)


class ScaledByABuffer(nn.Module):
    """Reads an expression of buffers: BatchNorm's running variance (moving every step) and a temperature of its
    own that the user anneals between steps."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, x):
        scale = self.bn.running_var.mean().rsqrt()
        return self.b(self.bn(self.a(x)) * scale) / self.temperature.clamp(min=0.1)


class NormalisesByRunningStatistics(nn.Module):
    """Reads BatchNorm's running statistics after the call that updates them (they depend on fc1's stage then),
    and shrinks a running variance in place through ``.data`` or a view (``how``)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)
        if self.how == "data":
            self.bn.running_var.data.mul_(0.9)
        elif self.how == "view":
            self.bn.running_var.view(-1).mul_(0.9)
        normalised = self.bn(h)
        if self.how == "after":
            normalised = (h - self.bn.running_mean) / torch.sqrt(self.bn.running_var + self.bn.eps)
        return self.fc2(torch.tanh(normalised))


@pytest.mark.parametrize("how", ["after", "data", "view"])
def test_running_statistics_read_after_their_update_or_changed_through_a_view_run_on_the_graph_engine(how):
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    model = NormalisesByRunningStatistics(how)
    if how != "after":
        model.eval()
    steps_on_the_graph_engine(BesideReference(model, ["fc1", "bn", "fc2"]), x, y, steps=4)


class Pick(nn.Module):
    """Owns a (frozen) parameter, so tracing calls it whole; returns a view of what it is given."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(6), requires_grad=False)

    def forward(self, b):
        return b.view(6)


class ViewedMean(nn.Module):
    """Owns a buffer (called whole): updates it from what it is given, returns a view of it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(6))

    def forward(self, h):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(h.mean(0), alpha=0.1)
        return self.mean[:4]


class ReadsAViewOfABuffer(nn.Module):
    """A view of a buffer read after the buffer's update, ``how``: made by a module called whole, returned by the
    module owning the buffer (called twice), or registered itself as a buffer."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False), nn.Linear(6, 3)
        self.pick, self.running, self.mid = Pick(), ViewedMean(), nn.Linear(6, 6)
        self.register_buffer("first_three", self.bn.running_mean[:3])

    def forward(self, x):
        if self.how == "module":
            view = self.pick(self.bn.running_var)  # taken before bn updates it
            h = self.fc1(x)
            self.bn(h)
            return self.fc2(h) * view.sum()
        if self.how == "owner":
            h = self.fc1(x)
            view = self.running(h)
            h = self.mid(h)
            self.running(h)  # updated again, from mid's value
            return self.fc2(h) * view.sum()
        h = self.fc1(x)
        self.bn(h)
        return self.fc2(h) * self.first_three.sum()


@pytest.mark.parametrize("how", ["module", "owner", "registered"])
def test_a_view_of_a_buffer_read_after_its_update_runs_on_the_graph_engine(how):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model = ReadsAViewOfABuffer(how)
    if how != "owner":
        model.mid.requires_grad_(False)  # unused there: no stage
    stages = ["fc1", "mid", "fc2"] if how == "owner" else ["fc1", "fc2"]
    steps_on_the_graph_engine(BesideReference(model, stages), x, y, steps=4)


class NormalisesWithItsOwnStatistics(nn.Module):
    """Hands batch norm's kernel running statistics made of fixed sizes: the kernel changes them in place with
    no version counter seeing it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        mean, var = torch.zeros(6), torch.ones(6)
        h = F.batch_norm(self.a(x), mean, var, training=True)
        return self.b(h + mean)


def test_a_constant_a_kernel_changes_without_a_version_is_refused():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    assert fallback_warnings(BesideReference(NormalisesWithItsOwnStatistics(), ["a", "b"]), x, y) == [
        f"backforward: step_batch runs the generic engine on NormalisesWithItsOwnStatistics: its forward "
        f"{CONSTANT_CHANGED}"]


class ShiftedByAnUnwritableBuffer(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        if kind == "inference":
            with torch.inference_mode():
                shift = torch.full((6,), 0.5)
        else:
            shift = torch.ones(1).expand(6)
        self.register_buffer("shift", shift)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) + self.shift))


@pytest.mark.parametrize("kind", ["inference", "expanded"])
def test_a_buffer_that_cannot_be_written_and_is_not_changed_steps_on_every_engine(kind):
    """Put back before each pass it cannot be written; it holds its values: left as it is (was a traceback)."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    steps_on_the_graph_engine(BesideReference(ShiftedByAnUnwritableBuffer(kind), ["fc1", "fc2"]), x, y)


def test_an_expression_on_buffers_is_recomputed_on_the_graph_engine():
    """Buffers are traced values: the expression is not fixed at the values tracing saw."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(ScaledByABuffer(), ["a", "bn", "b"])
    for t in range(4):
        for m in (twins.model, twins.ref):
            m.temperature.fill_(1.0 - 0.2 * t)
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "graph"


class RoundsThroughAName(nn.Module):
    def __init__(self, kept: bool):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        if kept:
            self.rounded = RoundsUnderGrad.apply  # on the module: not a name tracing finds

    def forward(self, x):
        rounded = self.rounded if hasattr(self, "rounded") else ROUNDED
        return self.b(rounded(torch.tanh(self.a(x))))


def test_a_custom_function_called_through_a_module_level_name_runs_on_the_graph_engine():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    steps_on_the_graph_engine(BesideReference(RoundsThroughAName(kept=False), ["a", "b"]), x, y)


def test_a_custom_function_called_through_a_name_tracing_cannot_find_is_refused_saying_why():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    assert fallback_warnings(BesideReference(RoundsThroughAName(kept=True), ["a", "b"]), x, y) == [
        "backforward: step_batch runs the generic engine on RoundsThroughAName: its forward runs a custom autograd "
        "Function on traced values through a name not looked up on the class as it runs (f = MyFunction.apply kept "
        "on an object), which tracing would trace through, dropping its backward"]


class SlowToTrace(nn.Module):
    """Sleeps while fx traces it, so that another thread reads its own model meanwhile."""

    def __init__(self, tracing: threading.Event):
        super().__init__()
        self.tracing = tracing
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        if isinstance(x, torch.fx.Proxy):
            self.tracing.set()
            time.sleep(0.3)
        return self.b(self.a(x) + torch.ones(x.shape[0], 1) + QUANTISE(x.sum(1, keepdim=True), 2.0))


QUANTISE = RoundedThrough.apply


def test_models_read_in_two_threads_at_once_are_read_one_at_a_time():
    """Overlapping, fx's patches and the recording ones would meet: put back in the wrong order, or a forward
    run while the other thread traces."""
    tracing, graphs, failures = threading.Event(), {}, []
    # Made here: a random draw in one thread while the other traces looks like that forward's own.
    models, x = {"first": SlowToTrace(tracing), "second": SlowToTrace(threading.Event())}, torch.randn(5, 4)

    def read(who: str) -> None:
        try:
            graphs[who] = model_graph(models[who], x)
        except Exception as e:  # noqa: BLE001 (reported below)
            failures.append(repr(e))

    first = threading.Thread(target=read, args=("first",))
    first.start()
    assert tracing.wait(10)
    assert type(torch.zeros(2)) is torch.Tensor  # factories record only in the thread that traces
    second = threading.Thread(target=read, args=("second",))
    second.start()
    first.join()
    second.join()
    assert not failures and graphs.keys() == {"first", "second"}, failures
    assert torch.ones is ONES and vars(torch.autograd.Function)["apply"].__func__ is APPLY
    assert "apply" in [op.name for op in graphs["second"].ops]  # QUANTISE recorded whole in both


# ---- found by the second mutation run ----

class TwoOutputs(nn.Module):
    """Owns its weights (so it is called whole, one op) and returns a tuple of tensors, as an LSTM does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(6, 4) / 2), nn.Parameter(torch.randn(6, 4) / 2)

    def forward(self, x):
        return F.linear(x, self.a), F.linear(x, self.b)


class ShiftsTheFirstInPlace(nn.Module):
    """Adds its own shift to the first tensor of the pair in place; the product saves both for backward."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.full((6,), 0.1))

    def forward(self, pair):
        first, second = pair
        first.add_(self.shift)
        return first * second


class PairThenShift(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.pair = TwoOutputs()
        self.shifter = ShiftsTheFirstInPlace()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shifter(self.pair(torch.tanh(self.stem(x))))))


def test_a_kept_tuple_of_tensors_that_a_later_call_modifies_in_place_is_caught():
    """The pair is kept from pass 3 (pair moved) for pass 4 (head): both its tensors are saved for backward, so
    keeping it costs nothing. But the shifter adds to the first in place after it was kept: the version check
    must look inside the tuple."""
    torch.manual_seed(0)
    model = PairThenShift().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["stem", "pair", "shifter", "head"])
    steps_on_the_graph_engine(twins, x, y)
    graph = next(iter(twins.bf._graphs.values()))
    assert [graph.ops[i].name for i in graph.volatile] == ["pair"]


class Annotated(nn.Module):
    """A forward with type annotations (fx passes them on with the placeholder and output nodes)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)) * scale)


def test_a_forward_with_annotated_arguments_runs_on_the_graph_engine():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(Annotated(), ["a", "b"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(3):
            twins.step(x, y, seed=t)
    assert twins.bf._engine == "graph" and not caught, [str(w.message) for w in caught]


class Masker(nn.Module):
    """Owns a buffer (so tracing calls it whole) and raises a bare ValueError, no message, without a mask."""

    def __init__(self):
        super().__init__()
        self.register_buffer("fill", torch.zeros(()))

    def forward(self, h, mask):
        if mask is None:
            raise ValueError
        return h.masked_fill(mask, float(self.fill))


class MaskedByDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.masker, self.l2 = nn.Linear(4, 6), Masker(), nn.Linear(6, 3)

    def forward(self, x, mask=None):
        h = self.l1(x)
        if mask is not None:  # tracing sees a Proxy and records the call; the graph then passes the default
            h = self.masker(h, mask)
        return self.l2(torch.tanh(h))


def test_a_traced_graph_failing_without_a_message_is_refused_saying_so():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(MaskedByDefault(), ["l1", "l2"])
    assert fallback_warnings(twins, x, y) == [
        "backforward: step_batch runs the generic engine on MaskedByDefault: its traced graph fails on the first "
        "batch (ValueError: no message), where forward() does not"]


class DropsAfterAnUntouchedDraw(nn.Module):
    """In time: p, q, dropout of p's output, dropout of q's output. A pass that recomputes q and its dropout but
    not p's dropout must draw q's mask where pass 1 drew it, after p's dropout drew its own."""

    def __init__(self):
        super().__init__()
        self.p, self.q, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        s = self.p(x)
        h = self.q(x)
        s = F.dropout(s, 0.5)
        h = F.dropout(h, 0.5)
        return self.head(h * s)


def test_a_recomputed_dropout_after_one_that_was_not_draws_pass_ones_mask():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(DropsAfterAnUntouchedDraw(), ["p", "q", "head"])
    steps_on_the_graph_engine(twins, x, y)


class ReusesItsFirstWeightLater(nn.Module):
    """a's weight enters first (a(x)) and again after q (F.linear(x, a.weight)): a's stage comes first."""

    def __init__(self):
        super().__init__()
        self.a, self.q, self.head = nn.Linear(4, 4, bias=False), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        u = self.q(torch.tanh(self.a(x)))
        v = F.linear(x, self.a.weight)
        return self.head(torch.tanh(v + u))


@pytest.mark.parametrize("entry", ["step", "step_batch"])
def test_a_parameter_used_again_later_is_ordered_by_its_first_use(entry):
    torch.manual_seed(0)
    model = ReusesItsFirstWeightLater()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["a", "q", "head"])
    for t in range(2):
        if entry == "step":
            torch.manual_seed(t)
            reference_step(twins.ref, twins.ref_opt, twins.ref_stages,
                           lambda: backward(F.cross_entropy(twins.ref(x), y)))
            twins.bf.step(lambda: backward(F.cross_entropy(model(x), y)))
            assert_same_params(model, twins.ref)
        else:
            twins.step(x, y, seed=t)
    assert twins.bf.stage_names == ["a", "q", "head"]


def test_a_checkpointed_forward_runs_on_the_graph_engine_inside_the_users_own_saved_tensor_hooks():
    """Under save_on_cpu the checkpoint, recorded as one call, runs inside the user's hooks in every pass."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(Checkpointed(), ["pre", "a", "b"])
    with torch.autograd.graph.save_on_cpu():
        steps_on_the_graph_engine(twins, x, y)


class ChecksItsLogits(nn.Module):
    """Returns its logits and also reads them in a check (torch._assert, which fx records)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        logits = self.b(torch.tanh(self.a(x)))
        torch._assert(torch.isfinite(logits).all(), "non-finite logits")
        return logits


def test_a_returned_value_that_another_operation_also_reads_runs_on_the_graph_engine():
    """The output is no in-place call: returning a value something else reads is no reason to refuse."""
    torch.manual_seed(0)
    model = ChecksItsLogits().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert twin_steps(model, F.cross_entropy, x, y, quiet=False, steps=3) == ["generic", "graph", "graph"]


class TracksItsMeanLogit(nn.Module):
    """Keeps a running mean of its logits in a buffer of its own, updated by calls on the buffer itself; ``by``
    reaching it as an attribute (tracing records the calls) or through ``_buffers`` (tracing runs them)."""

    def __init__(self, by: str):
        super().__init__()
        self.by = by
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("mean_logit", torch.ones(()))

    def forward(self, x):
        logits = self.b(torch.tanh(self.a(x)))
        mean = self.mean_logit if self.by == "attribute" else self._buffers["mean_logit"]
        mean.mul_(0.9).add_(0.1 * logits.detach().mean())
        return logits


@pytest.mark.parametrize("by, engine, said", [
    ("attribute", "graph", []),
    ("dict", "generic", ["backforward: step_batch runs the generic engine on TracksItsMeanLogit: its forward changes a "
                         "buffer by calls on the buffer itself, which tracing runs once instead of recording"])])
def test_a_buffer_the_root_forward_updates_by_its_own_calls_advances_once_per_step(by, engine, said):
    """Reached as an attribute, the buffer is a traced value and its updates are recorded; through ``_buffers``,
    tracing runs ``mul_(0.9)`` on the real buffer (no proxy in it) and records only the ``add_``: refused."""
    torch.manual_seed(0)
    model = TracksItsMeanLogit(by).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            mean = float(copy.deepcopy(model)(x).detach().mean())  # the logits at θ_t
            expected = 0.9 * float(model.mean_logit) + 0.1 * mean  # one plain forward's worth
            opt.step_batch(x, y, F.cross_entropy)
            assert float(model.mean_logit) == pytest.approx(expected, rel=1e-12)
    assert opt._engine == engine
    assert [str(w.message) for w in caught] == said


class Tanh(nn.Module):
    """tanh, counting how often it ran in a private attribute (no parameters: tracing goes inside)."""

    def __init__(self):
        super().__init__()
        self._runs = 0

    def forward(self, x):
        self._runs += 1
        return torch.tanh(x)


class CountsItsCalls(nn.Module):
    """Counts its forward calls in a plain attribute, as a model might keep a statistic; so does a child."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(4, 6), Tanh(), nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.b(self.act(self.a(x)))


def test_a_forward_setting_plain_attributes_is_not_traced_and_counts_as_the_reference_does():
    # A traced graph would leave the count where the last generic step left it; the reference runs the
    # forward once per pass. Tracing and its check leave the count as they found it.
    torch.manual_seed(0)
    model = CountsItsCalls()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["a", "b"])
    assert fallback_warnings(twins, x, y, steps=3) == [
        "backforward: step_batch runs the generic engine on CountsItsCalls: its forward sets attributes (calls, "
        "act._runs), which a traced graph would not set"]
    assert model.calls == model.act._runs == twins.ref.calls == 2 * 3


def test_a_chain_whose_child_keeps_a_count_runs_the_generic_engine_and_counts_as_the_reference_does():
    """A chain calls its children whole: the chain engine would call the counting child fewer times per step than
    the reference's passes do. Refused, in one line; the generic engine counts as the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), CountsItsCalls())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["0", "1.a", "1.b"])
    assert fallback_warnings(twins, x, y, steps=3) == [
        "backforward: step_batch runs the generic engine on Sequential: its forward keeps state in attributes "
        "(1.calls, 1.act._runs), which passes recomputing fewer modules than a plain forward would not advance "
        "alike"]
    assert model[1].calls == twins.ref[1].calls == 3 * 3


class KeepsMeanByHand(nn.Module):
    """Subtracts a running mean of its input, kept in a plain tensor attribute (not a registered buffer)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.mean = torch.zeros(6)

    def forward(self, x):
        self.mean = 0.5 * self.mean + 0.5 * x.detach().mean(0)
        return self.lin(x - self.mean)


@pytest.mark.parametrize("kind", ["chain", "graph"])
def test_state_kept_in_a_plain_tensor_attribute_runs_the_generic_engine_from_the_first_step_on(kind):
    """The forwards that read the model (the probe; the traced graph's check) put the attribute back, so even the
    first step equals the reference; passes recomputing fewer modules would advance it otherwise: refused."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), KeepsMeanByHand(), nn.Tanh(), nn.Linear(6, 3))
    model = chain if kind == "chain" else Traced(chain)
    prefix = "" if kind == "chain" else "inner."
    twins = BesideReference(model, [f"{prefix}0", f"{prefix}2.lin", f"{prefix}4"])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    said = fallback_warnings(twins, x, y, steps=3)
    assert len(said) == 1 and (f"its forward keeps state in attributes ({prefix}2.mean)" if kind == "chain" else
                               f"its forward sets attributes ({prefix}2.mean), which a traced graph") in said[0]
    assert torch.equal(chain[2].mean, twins.ref[2].mean if kind == "chain" else twins.ref.inner[2].mean)


def test_an_attribute_each_call_recomputes_is_no_state():
    """Legacy spectral_norm sets its module's weight attribute anew in every call, from parameters and buffers:
    the same again in a second forward from the same buffers, so the chain engine runs, and equals the reference
    (its power-iteration buffers advance once per step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3))
    twins = BesideReference(model, ["0", "2"])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for t in range(3):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "chain"


class RunningMean(nn.Module):
    """Subtracts a running mean of its input, kept in a buffer updated in place in training."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.5).add_(0.5 * x.mean(0))
        return x - self.mean


class ScalesByAnothersMean(nn.Module):
    """Scales its input by its own weight and by another module's running mean, reached through a plain list
    (outside the module tree, so not among its buffers)."""

    def __init__(self, other: RunningMean):
        super().__init__()
        self._other = [other]
        self.weight = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return x * self.weight * (1 + self._other[0].mean)


class ListCount(nn.Module):
    """Scales by a count of its calls kept in a list."""

    def __init__(self):
        super().__init__()
        self.count = [0]

    def forward(self, x):
        self.count[0] += 1
        return x * (1 + 0.01 * self.count[0])


class OwnNoise(nn.Module):
    """Adds noise from a generator of its own (not replayed: each call draws anew)."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(1)

    def forward(self, x):
        return x + 0.1 * torch.randn(x.shape, generator=self.generator)


class MovesItsWeight(nn.Linear):
    def forward(self, x):
        with torch.no_grad():
            self.weight.mul_(0.99)
        return super().forward(x)


class MovesItsWeightData(nn.Linear):
    """Changes its weight through ``.data``, which bumps no version counter."""

    def forward(self, x):
        self.weight.data.mul_(0.99)
        return super().forward(x)


@pytest.mark.parametrize("child, said", [(ListCount, "1.count"), (OwnNoise, "1.generator"),
                                         (MovesItsWeight, "1.weight (a parameter, changed in place)"),
                                         (MovesItsWeightData, "1.weight (a parameter, changed in place)")])
def test_state_kept_outside_plain_numbers_is_refused(child, said):
    """A count in a list, a module's own generator, a parameter the forward changes in place: passes calling the
    module fewer times than the reference's would advance them otherwise. The reading forwards put all of them
    back (the weight from a copy), so the generic engine equals the reference from the first step."""
    torch.manual_seed(0)
    linear = child in (MovesItsWeight, MovesItsWeightData)
    model = nn.Sequential(nn.Linear(4, 6), child(6, 6) if linear else child(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ref = copy.deepcopy(model)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.step_batch(x, y, F.cross_entropy)
    assert opt._engine == "generic"
    assert [str(w.message) for w in caught] == [
        f"backforward: step_batch runs the generic engine on Sequential: its forward keeps state in attributes "
        f"({said}), which passes recomputing fewer modules than a plain forward would not advance alike"]
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        reference_step(ref, ref_opt, [list(m.parameters()) for m in ref if list(m.parameters())],
                       lambda: backward(F.cross_entropy(ref(x), y)))
    assert_same_params(model, ref)


class KeepsIn(nn.Module):
    """State in a container attribute: a running mean in a dict updated in place, a count nested in a dict, a count
    in a deque."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.state = {"dict": {"mean": torch.zeros(6)}, "nested": {"count": [0]}, "deque": collections.deque([0]),
                      "resized": torch.tensor([]), "steps": torch.tensor(0)}.get(kind)
        if kind == "added":
            del self.state

    def forward(self, x):
        if self.kind == "resized":  # a total of the inputs' means, sized on the first call
            if self.state.numel() == 0:
                self.state.resize_(x.shape[1:]).zero_()
            self.state.add_(x.detach().mean(0))
            return x
        if self.kind == "steps":  # a count in an integer tensor made anew each call
            self.state = self.state + 1
            return x * (1 + 0.01 * self.state)
        if self.kind == "added":  # a count the first call adds
            self.state = getattr(self, "state", 0) + 1
            return x * (1 + 0.01 * self.state)
        if self.kind == "dict":
            self.state["mean"].mul_(0.5).add_(0.5 * x.detach().mean(0))
            return x - self.state["mean"]
        if self.kind == "nested":
            self.state["count"][0] += 1
            return x * (1 + 0.01 * self.state["count"][0])
        self.state.append(self.state.popleft() + 1)
        return x * (1 + 0.01 * self.state[0])


@pytest.mark.parametrize("kind", ["dict", "nested", "deque", "resized", "steps", "added"])
def test_state_kept_in_containers_is_refused_and_the_reading_puts_it_back(kind):
    """State in a container, in a tensor changed in place (resized on the first call) or made anew, in an
    attribute the first call adds: refused, and put back after the reading (so the state equals the
    reference's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), KeepsIn(kind), nn.Linear(6, 3))
    twins = BesideReference(model, ["0", "2"])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    said = fallback_warnings(twins, x, y, steps=3)
    assert len(said) == 1 and "keeps state in attributes (1.state)" in said[0]
    if kind in ("resized", "steps", "added"):
        assert torch.equal(torch.as_tensor(model[1].state), torch.as_tensor(twins.ref[1].state))


class FailsOnItsSecondCall(nn.Module):
    """Deletes a cache on its first call: the reading's second forward, with that state advanced, fails."""

    def __init__(self):
        super().__init__()
        self.cache = torch.zeros(())

    def forward(self, x):
        del self.cache
        return x


def test_a_forward_failing_once_its_state_advanced_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), FailsOnItsSecondCall(), nn.Linear(6, 3))
    with pytest.raises(Refusal, match=r"keeps state in attributes \(1\.cache\)"):
        model_graph(model, torch.randn(5, 4))
    assert torch.equal(model[1].cache, torch.zeros(()))


class HoldsAlike(nn.Module):
    """Attributes a forward leaves alone or sets anew to equal values each call: no state."""

    def __init__(self, running_mean: torch.Tensor):
        super().__init__()
        self.cycle = [1]
        self.cycle.append(self.cycle)
        self.limit = float("nan")
        self.view = running_mean.expand(2, -1)  # shares the version counter of a buffer the step moves

    def forward(self, x):
        self.seen = (x.shape, x.detach().sum().item() * 0, torch.zeros(1))
        self.undefined = torch.full((2,), float("nan"))
        self.limit = float("nan")  # another float object, NaN again
        if hasattr(self, "view"):
            del self.view  # gone after the first call, as in the reference
        return x


def test_attributes_without_state_keep_the_chain_engine():
    """A list holding itself, a NaN, a view of a buffer the BatchNorm updates (deleted by the first call), a tuple
    made anew each call (a torch.Size and a tensor in it): the chain engine runs, exactly."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(6)
    model = nn.Sequential(nn.Linear(4, 6), norm, HoldsAlike(norm.running_mean), nn.Tanh(), nn.Linear(6, 3))
    twins = BesideReference(model, ["0", "1", "4"])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for t in range(3):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "chain" and not hasattr(model[2], "view")


def test_a_parametrized_lstm_keeps_the_chain_engine():
    """weight_norm on an LSTM's weight makes it rebuild a list of weak references each call: no state."""
    torch.manual_seed(0)
    lstm = nn.utils.parametrizations.weight_norm(nn.LSTM(3, 4, batch_first=True), "weight_hh_l0")
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), lstm, SelectOutput(), nn.Flatten(),
                          nn.Linear(8, 3))
    stages = [list(model[0].parameters()), list(lstm.parametrizations.weight_hh_l0.parameters()),
              list(lstm.parameters(recurse=False)), list(model[5].parameters())]  # the default stages, in data flow
    ref, ref_stages = clone(model, stages)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref))
    bf = Backforward(model, opt)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for t in range(3):
        torch.manual_seed(t)
        reference_step(ref, ref_opt, ref_stages, lambda: backward(F.cross_entropy(ref(x), y)))
        torch.manual_seed(t)
        bf.step_batch(x, y, F.cross_entropy)
        assert_same_params(model, ref)
    assert bf._engine == "chain"


class SelectOutput(nn.Module):
    def forward(self, out):
        return out[0]


class ScalesOnFirstCall(nn.Module):
    """Data-dependent initialisation (ActNorm): a buffer that is None until the first forward sets it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", None)

    def forward(self, x):
        if self.scale is None:
            self.scale = x.detach().std(0) + 1.0
        return x / self.scale


def test_a_buffer_set_by_the_first_forward_is_traced_again_once_set():
    """The first graph is traced with the buffer still None (and the reading leaves it None); once the first step
    set it, the model is traced again, and the graph engine equals the reference."""
    torch.manual_seed(0)
    model = Traced(nn.Sequential(nn.Linear(4, 6), ScalesOnFirstCall(), nn.Tanh(), nn.Linear(6, 3)))
    twins = BesideReference(model, ["inner.0", "inner.3"])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for t in range(4):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "graph" and torch.equal(model.inner[1].scale, twins.ref.inner[1].scale)


class CountsWhenAsked(nn.Module):
    """Keeps a count, which its output depends on, once its public flag is switched on."""

    def __init__(self):
        super().__init__()
        self.counting = False
        self.count = 0

    def forward(self, x):
        if self.counting:
            self.count += 1
        return x * (1 + 0.01 * self.count)


@pytest.mark.parametrize("traced", [False, True])
def test_a_flag_switched_on_later_is_read_again(traced):
    """Read with the flag off, the module keeps no state (the fast engine runs); switched on, it keeps a count
    that the last pass, not calling it, would not advance: the next step reads the model again and refuses it."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(4, 6), CountsWhenAsked(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model = Traced(chain) if traced else chain
    twins = BesideReference(model, [f"inner.{i}" if traced else str(i) for i in (0, 2, 4)])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for t in range(3):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == ("graph" if traced else "chain")
    counters = [m for m in (*model.modules(), *twins.ref.modules()) if isinstance(m, CountsWhenAsked)]
    for counter in counters:
        counter.counting = True
    said = fallback_warnings(twins, x, y)
    assert len(said) == 1 and "counting" not in said[0]
    assert ("sets attributes (inner.1.count), which a traced graph" if traced else "keeps state in attributes") \
        in said[0]
    assert [c.count for c in counters] == [6, 6]  # two steps of three passes, as the reference


def test_a_hook_added_later_to_a_chain_child_has_it_read_again():
    """A hook on the first child reading the last stage's weight, added after the chain engine ran: read again, the
    first child depends on the last stage too, so the pass after it moved (reverse order) recomputes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    twins = BesideReference(model, ["0", "2", "4"])
    twins.bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), order="reverse")
    twins.ref_stages.reverse()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for t in range(3):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "chain"
    for m in (model, twins.ref):
        m[0].register_forward_hook(lambda module, args, out, m=m: out + 0.1 * m[4].weight.sum())
    # In data flow the last stage's weight now enters second, at the hook: reversed, stages 2, 4, 0.
    twins.ref_stages = [list(twins.ref[i].parameters()) for i in (2, 4, 0)]
    for t in range(3):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "chain" and twins.bf.stage_names == ["0", "4", "2"]


class Scheduled(nn.Module):
    """Tracing unrolls the loop over a list, bakes in a rate read from a dict and the function it calls."""

    def __init__(self):
        super().__init__()
        self.inp, self.layers, self.out = nn.Linear(6, 6), nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)]), \
            nn.Linear(6, 3)
        self.active = [0]
        self.config = {"scale": 1.0}
        self.activation = torch.tanh

    def forward(self, x):
        h = self.activation(self.inp(x))
        for i in self.active:
            h = self.activation(self.layers[i](h))
        return self.out(h) * self.config["scale"]


@pytest.mark.parametrize("change", [lambda m: m.active.append(1), lambda m: m.config.update(scale=3.0),
                                    lambda m: setattr(m, "activation", torch.relu)],
                         ids=["list", "dict", "function"])
def test_a_list_dict_or_function_changed_later_has_the_model_traced_again(change):
    torch.manual_seed(0)
    model = Scheduled()
    twins = BesideReference(model, ["inp", "layers.0", "layers.1", "out"])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    steps_on_the_graph_engine(twins, x, y)
    change(model)
    change(twins.ref)  # (layers.1, unused first, is a stage: its place among the stages counts once in use)
    steps_on_the_graph_engine(twins, x, y)


class Mode(enum.Enum):
    PLAIN = 1
    DOUBLED = 2


@dataclasses.dataclass
class Config:
    scale: float = 1.0


@dataclasses.dataclass(slots=True)
class SlottedConfig:
    scale: float = 1.0


class Configured(nn.Module):
    """Reads a setting held in one kind of object; tracing fixes what it read."""

    def __init__(self, kind: str):
        super().__init__()
        self.inp, self.layers, self.out = nn.Linear(6, 6), nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)]), \
            nn.Linear(6, 3)
        self.kind = kind
        self.setting = {"namespace": types.SimpleNamespace(scale=1.0), "dataclass": Config(),
                        "slots": SlottedConfig(), "enum": Mode.PLAIN, "numpy": np.float32(1.0), "set": {0},
                        "nested": (types.SimpleNamespace(scale=1.0),)}[kind]

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.kind == "set":
            for i in sorted(self.setting):
                h = torch.tanh(self.layers[i](h))
        if self.kind == "enum":
            scale = 2.0 if self.setting is Mode.DOUBLED else 1.0
        elif self.kind == "numpy":
            scale = float(self.setting)
        elif self.kind == "nested":
            scale = self.setting[0].scale
        else:
            scale = getattr(self.setting, "scale", 1.0)
        return self.out(h) * scale


CHANGES = {"namespace": lambda m: setattr(m.setting, "scale", 3.0),
           "dataclass": lambda m: setattr(m.setting, "scale", 3.0),
           "slots": lambda m: setattr(m.setting, "scale", 3.0),
           "enum": lambda m: setattr(m, "setting", Mode.DOUBLED),
           "numpy": lambda m: setattr(m, "setting", np.float32(3)),
           "set": lambda m: m.setting.add(1),
           "nested": lambda m: setattr(m.setting[0], "scale", 3.0)}


@pytest.mark.parametrize("kind", list(CHANGES))
def test_a_setting_in_a_namespace_dataclass_enum_numpy_scalar_or_set_changed_later_is_read_again(kind):
    torch.manual_seed(0)
    model = Configured(kind)
    twins = BesideReference(model, ["inp", "layers.0", "layers.1", "out"])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    steps_on_the_graph_engine(twins, x, y)
    CHANGES[kind](model)
    CHANGES[kind](twins.ref)
    steps_on_the_graph_engine(twins, x, y)


class LeakySkip(nn.Module):
    """A skip around a LeakyReLU, divided by a rate read from it: tracing fixes the rate, and checks that nothing
    changes in place a value the skip also reads."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(6, 6), nn.LeakyReLU(0.1), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h + self.act(h) / (1 + self.act.negative_slope))


@pytest.mark.parametrize("change", ["inplace", "negative_slope"])
def test_a_torch_nn_modules_attribute_changed_later_has_a_traced_model_read_again(change):
    """Called whole, a torch.nn module runs its new setting, but a traced forward read its rate, and an in-place
    activation now changes the value the skip reads (refused when traced: the generic engine runs)."""
    torch.manual_seed(0)
    model = LeakySkip()
    twins = BesideReference(model, ["a", "b"])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    steps_on_the_graph_engine(twins, x, y)
    for m in (model, twins.ref):
        setattr(m.act, change, True if change == "inplace" else 0.5)
    if change == "inplace":
        said = fallback_warnings(twins, x, y)
        assert len(said) == 1 and "act changes a in place while other operations read it too" in said[0]
    else:
        steps_on_the_graph_engine(twins, x, y)


class DropsItsBuffer(nn.Module):
    """Scales by a buffer it deletes on its first call."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x):
        if "scale" in self._buffers:
            scale = self._buffers.pop("scale")
            return x * scale
        return x


def test_a_chain_child_deleting_its_buffer_is_read_and_stepped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), DropsItsBuffer(), nn.Tanh(), nn.Linear(4, 3))
    twins = BesideReference(model, ["0", "3"])
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for t in range(3):
        twins.step(x, y, seed=t)
    assert dict(model.named_buffers()) == {}


class TwoHeads(nn.Module):
    """The loss picks one of two outputs per batch: b is used in one and not in the other."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(h), self.c(torch.tanh(self.b(h)))


def pick_output(out, y):
    return F.cross_entropy(out[int(y[0])], y)


@pytest.mark.parametrize("chain, inplace", [(False, False), (True, False), (True, True)])
def test_a_batch_whose_data_flow_orders_the_stages_otherwise_is_run_in_its_order(chain, inplace):
    """The order is data flow, read from each step's first pass (unused stages last): a batch that uses a stage
    the last one did not (a head the loss picks, a branch a child takes) runs in its own order, undone and run
    again by the generic engine where the fast engine's plan had another; batches in the planned order run fast.
    A batch the model changes in place (dropout first) is put back for the run again."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Dropout(0.3, inplace=True)] * inplace, Routed(6, 6), nn.Tanh(), nn.Linear(6, 3)) \
        if chain else TwoHeads()
    loss_fn = F.cross_entropy if chain else pick_output
    ref = copy.deepcopy(model)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, ref))
    bf = Backforward(model, opt)
    # Worked out by hand: which stage each batch uses, and where it enters.
    orders = ([f"{inplace:d}.first", f"{2 + inplace}", f"{inplace:d}.second"],
              [f"{inplace:d}.second", f"{2 + inplace}", f"{inplace:d}.first"]) if chain else \
        (["a", "c", "b"], ["a", "b", "c"])
    engines = []
    for t, which in enumerate([0, 0, 0, 1, 1, 0, 1]):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(8, 6, generator=g).abs() * (1 if which == 0 else -1)
        y = torch.randint(0, 3, (8,), generator=g) if chain else torch.full((8,), which)
        torch.manual_seed(t)
        bf.step_batch(x, y, loss_fn)
        engines.append(bf._engine)
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(t)).abs() * (1 if which == 0 else -1)
        torch.manual_seed(t)
        reference_step(ref, ref_opt, [list(ref.get_submodule(n).parameters()) for n in orders[which]],
                       lambda x=x, y=y: backward(loss_fn(ref(x.clone()), y)))
        assert_same_params(model, ref)
        assert bf.stage_names == orders[which]
    fast = "chain" if chain else "graph"
    assert engines == ["generic", fast, fast, "generic", fast, "generic", "generic"]


class Scales(nn.Module):
    """A plain rate of its own (a user's module: its settings are part of the graph's key)."""

    def __init__(self):
        super().__init__()
        self.rate = 1.0

    def forward(self, x):
        return x * self.rate


@pytest.mark.parametrize("traced", [False, True])
def test_rates_changed_every_step(traced):
    """A rate annealed every step: on a chain, torch.nn's own modules (dropout's p, called whole) keep the graph and
    the fast engine; a traced model is read again (its forward may read the rate, or an in-place flag); a user's
    module is read again each step, and only the last few graphs are kept (no growth step after step)."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 6), Scales(), nn.Tanh(), nn.Linear(6, 3))
    model = Traced(chain) if traced else chain
    twins = BesideReference(model, [f"inner.{i}" if traced else str(i) for i in (0, 2, 5)])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    fast = "graph" if traced else "chain"
    for t in range(4):
        for m in (model, twins.ref):
            next(c for c in m.modules() if isinstance(c, nn.Dropout)).p = 0.5 - 0.1 * t
        twins.step(x, y, seed=t)
    assert (twins.bf._engine, len(twins.bf._graphs)) == (("generic", 4) if traced else (fast, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(12):
            for m in (model, twins.ref):
                next(c for c in m.modules() if isinstance(c, Scales)).rate = 1.0 + 0.01 * t
            twins.step(x, y, seed=t)
    assert twins.bf._engine == "generic"  # a new graph each step: its first step reads the stage order
    assert len(twins.bf._graphs) == 8 and len(twins.bf._plan.engines) <= 8


class CachesInADict(nn.Module):
    """Keeps a running mean in a dict (tracing, passing through it, fills the dict with a proxy)."""

    def __init__(self):
        super().__init__()
        self.state = {"mean": torch.zeros(())}

    def forward(self, x):
        self.state["mean"] = 0.5 * self.state["mean"] + 0.5 * x.detach().mean()
        return x - self.state["mean"]


def test_tracing_leaves_no_proxy_in_a_modules_dict():
    torch.manual_seed(0)
    model = Traced(nn.Sequential(nn.Linear(4, 6), CachesInADict(), nn.Linear(6, 3)))
    twins = BesideReference(model, ["inner.0", "inner.2"])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    said = fallback_warnings(twins, x, y, steps=2)
    assert len(said) == 1 and "its forward sets attributes (inner.1.state), which a traced graph" in said[0]
    assert type(model.inner[1].state["mean"]) is torch.Tensor
    model(x)


class KeepsAConstant(nn.Module):
    """Adds a constant kept in a plain attribute that cannot be written in place (an expanded tensor, or one made
    in inference mode): the reading forwards must not try to."""

    def __init__(self, kind: str):
        super().__init__()
        if kind == "expanded":
            self.shift = torch.tensor(0.5).expand(6)
        else:
            with torch.inference_mode():
                self.shift = torch.full((6,), 0.5)

    def forward(self, x):
        return x + self.shift


@pytest.mark.parametrize("kind", ["expanded", "inference"])
def test_a_constant_attribute_that_cannot_be_written_keeps_the_chain_engine(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), KeepsAConstant(kind), nn.Tanh(), nn.Linear(6, 3))
    twins = BesideReference(model, ["0", "3"])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for t in range(3):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "chain"


class RebindsItsMean(RunningMean):
    """A running mean rebound to a new tensor in each call (``self.mean = ...``), not updated in place."""

    def forward(self, x):
        if self.training:
            self.mean = 0.5 * self.mean + 0.5 * x.detach().mean(0)
        return x - self.mean


@pytest.mark.parametrize("kind", ["chain", "graph"])
@pytest.mark.parametrize("rebinds", [False, True])
def test_a_buffer_read_outside_the_module_tree_is_read_after_its_module_updated_it(kind, rebinds):
    """In every pass of the reference the running mean is updated (in place, or rebound to a new tensor) before
    the later module reads it: a pass that recomputes the reader runs the updating module too (the probe finds
    that both touch the buffer)."""
    torch.manual_seed(0)
    mean = RebindsItsMean(6) if rebinds else RunningMean(6)
    chain = nn.Sequential(nn.Linear(4, 6), mean, nn.Tanh(), nn.Linear(6, 6), ScalesByAnothersMean(mean), nn.Tanh(),
                          nn.Linear(6, 3))
    model = chain if kind == "chain" else Traced(chain)
    prefix = "" if kind == "chain" else "inner."
    twins = BesideReference(model, [f"{prefix}{i}" for i in (0, 3, 4, 6)])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for t in range(4):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == kind


class MaxSoFar(nn.Module):
    """The running maximum of its input, in a buffer that starts empty and is resized in place on the first call
    (as the per-channel observers of torch.ao's quantization-aware training do)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("most", torch.tensor([]))

    def forward(self, x):
        with torch.no_grad():
            now = x.amax(0)
            if self.most.numel() == 0:
                self.most.resize_(now.shape).copy_(now)
            else:
                torch.maximum(self.most, now, out=self.most)
        return x


def test_a_buffer_resized_in_place_is_put_back_with_its_shape():
    """Every pass sees the buffer as the step began (empty, in the first), also where a failed step is undone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), MaxSoFar(), nn.Tanh(), nn.Linear(6, 3))
    twins = BesideReference(model, ["0", "3"])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    fresh = copy.deepcopy(model)
    failing = Backforward(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    passes = []

    def fails_in_the_second_pass():
        passes.append(1)
        if len(passes) == 2:
            raise KeyError("stop")
        return backward(F.cross_entropy(fresh(x), y))

    with pytest.raises(KeyError):
        failing.step(fails_in_the_second_pass)
    assert fresh[1].most.shape == (0,)
    for t in range(3):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "chain" and model[1].most.shape == (6,)


def test_a_lazy_module_is_refused_until_a_forward_initialized_it():
    model = nn.Sequential(nn.LazyLinear(6), nn.Tanh(), nn.Linear(6, 3))
    with pytest.raises(ValueError) as refused:
        Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert str(refused.value) == ("the model has parameters that are not initialized yet (a lazy module such as "
                                  "nn.LazyLinear): run one forward pass first")
    model(torch.randn(2, 4))
    twins = BesideReference(model, ["0", "2"])
    for t in range(2):
        twins.step(torch.randn(5, 4), torch.randint(0, 3, (5,)), seed=t)


class ReturnsItself(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))), self


def test_a_forward_returning_its_module_runs_the_generic_engine():
    torch.manual_seed(0)
    model = ReturnsItself()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.step_batch(x, y, lambda out, target: F.cross_entropy(out[0], target))
    said = [str(w.message) for w in caught]
    assert opt._engine == "generic" and said == [
        "backforward: step_batch runs the generic engine on ReturnsItself: torch.fx's graph of it cannot be read as "
        "calls: 'ReturnsItself' object has no attribute ''"]


def test_values_nothing_modifies_in_place_are_fed_to_later_passes_without_a_copy(monkeypatch):
    """Only a value found modified in place is handed out as a copy (to a pass that is not its last reader):
    SideBranch keeps h and s over several passes and modifies neither."""
    import backforward.graph as graph

    copies = []
    real = graph._feed
    monkeypatch.setattr(graph, "_feed", lambda kept, copy: copies.append(copy) or real(kept, copy=copy))
    torch.manual_seed(1)
    model = SideBranch()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["stem", "side", "a", "b", "head"])
    for _ in range(3):
        twins.step(x, y)
    assert twins.bf._engine == "graph" and copies and not any(copies)


class LetsGo(nn.Module):
    """stem's output is read once (by tanh, which keeps only its own output for backward); ``out += skip(h)``
    is found modifying a kept value in the first graph step, whose later passes then run whole."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.skip, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        out = self.a(h)
        out += self.skip(h)
        return self.head(out)


def test_each_pass_lets_a_value_go_after_its_last_read_and_keeps_nothing_after_the_step():
    """As CPython frees the plain forward's temporaries: by the time the head runs, stem's output is gone, in
    the planned passes, in the passes run whole and in the generic engine's; after each step nothing is held."""

    torch.manual_seed(5)
    model = LetsGo()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["stem", "a", "skip", "head"])
    stem_outputs, alive = [], []
    model.stem.register_forward_hook(lambda _m, _a, out: stem_outputs.append(weakref.ref(out)))
    model.head.register_forward_pre_hook(lambda _m, _a: alive.append(stem_outputs[-1]() is not None))
    engines, held = [], []
    for t in range(4):
        twins.step(x, y, seed=t)
        engines.append(twins.bf._engine)
        held.append(twins.bf._held_between_passes())
    graph = next(iter(twins.bf._graphs.values()))
    assert engines == ["generic", "graph", "graph", "graph"] and [graph.ops[i].name for i in graph.volatile] == ["a"]
    # 4 passes a step, and in step 1 the check of the traced graph: forward() (alive[0]), then the graph run
    # whole twice, holding every value (alive[1]; alive[2], the probe reading which values backward saves and
    # which parameters each op reads), before the passes.
    assert len(alive) == 3 + 4 * 4 and not any(alive[:1] + alive[3:])
    assert held == [[]] * 4


def test_values_found_modified_in_place_in_different_steps_are_all_remembered():
    """a's output is found modified in place in the first graph step (whose later passes then run whole, so
    c's is not looked at), c's in the next: from then on both are copies, neither found again."""

    class TwoInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.skip = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6)
            self.c, self.d, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.stem(x))
            out = self.a(h)
            out += self.skip(h)
            z = self.c(torch.tanh(out))
            z += self.d(out)
            return self.head(z)

    torch.manual_seed(5)
    model = TwoInPlace()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["stem", "a", "skip", "c", "d", "head"])
    graph, found = None, []
    for t in range(5):
        twins.step(x, y, seed=t)
        graph = graph or next(iter(twins.bf._graphs.values()))
        found.append(sorted(graph.ops[i].name for i in graph.volatile))
    assert found == [[], ["a"], ["a", "c"], ["a", "c"], ["a", "c"]]


class KeepsANaN(nn.Module):
    """Holds a buffer with a NaN in it that its forward reads (NaN is not equal to itself)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("marks", torch.tensor([float("nan"), 1.0]))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * self.marks[1])


def test_a_buffer_holding_nan_is_not_taken_for_one_that_tracing_changed():
    torch.manual_seed(0)
    model = KeepsANaN()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        opt.step_batch(x, y, F.cross_entropy)
    assert opt._engine == "graph"


# ---- what the graph records: buffers, the values autograd saves, what a pass recomputes ----

class ScaledAndShifted(nn.Module):
    """A learnable scale (a parameter) and an offset (a buffer), both read by attribute in the forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("offset", torch.ones(3))

    def forward(self, x):
        return self.a(x) * self.scale + self.offset


def test_a_parameter_read_by_attribute_is_not_taken_for_a_buffer():
    # Ops touching the same buffer are recomputed together; a parameter taken for one would tie ops for nothing.
    model = ScaledAndShifted()
    graph = model_graph(model, torch.randn(5, 4))
    reads = {name: [op for op in graph.ops if any(graph.ops[r].name == name for r in op.reads)]
             for name in ("scale", "offset")}
    assert [op.buffers for op in reads["scale"]] == [()]
    assert [op.buffers for op in reads["offset"]] == [(id(model.offset),)]
    assert {b for op in graph.ops for b in op.buffers} == {id(model.offset)}


class ViewsTheBatchLast(nn.Module):
    """Reads a slice of the batch (a view: its memory) after the rest; nothing saves the batch for backward
    (an addition and a slice save nothing)."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(4))
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(torch.tanh(x + self.shift)) + x[:, :3]


def test_views_of_the_batch_count_as_saved_values_though_autograd_saves_nothing_of_the_batch():
    # Keeping a view of the batch for a later pass costs no memory a plain step does not hold.
    graph = model_graph(ViewsTheBatchLast(), torch.randn(5, 4))
    names = [op.name for op in graph.ops]
    assert names.index("getitem") in graph.saved
    assert names.index("x") in graph.saved
    assert names.index("add") not in graph.saved  # x + shift: read by tanh, which saves its output, not its input


class SplitsInTwo(nn.Module):
    def __init__(self, reread: bool):
        super().__init__()
        self.reread = reread
        self.a, self.b = nn.Linear(4, 6), nn.Linear(3, 3)

    def forward(self, x):
        left, right = torch.chunk(self.a(x), 2, dim=1)  # one op whose value is a tuple of views of a's output
        return self.b(left) + right if self.reread else self.b(torch.tanh(left) + torch.tanh(right))


@pytest.mark.parametrize("reread", [True, False])
def test_a_value_holding_several_tensors_counts_as_saved_where_autograd_saves_their_memory(reread):
    # b saves its input (a view of a's output), so the chunks' memory is saved; tanh saves its output, not its
    # input, and then nothing saves a's output.
    graph = model_graph(SplitsInTwo(reread), torch.randn(5, 4))
    names = [op.name for op in graph.ops]
    assert (names.index("chunk") in graph.saved) is reread


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x)


def test_a_value_holding_exactly_the_saved_memory_counts_as_saved():
    # The layer's backward saves the batch alone (its input; the weight's gradient needs it): the batch is saved,
    # the output is not.
    graph = model_graph(OneLayer(), torch.randn(5, 4))
    assert [op.name for op in graph.ops] == ["x", "a", "output"]
    assert graph.saved == {0}


class ReturnsFeatures(nn.Module):
    """Returns the logits and, computed after them, features of a side branch (as models for a contrastive or
    auxiliary loss do): the op before the output is not the one carrying the logits."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(4, 5)

    def forward(self, x):
        logits = self.b(torch.tanh(self.a(x)))
        features = torch.tanh(self.c(x))
        return logits, features


def test_a_pass_recomputes_only_what_depends_on_its_stages_when_the_output_reads_an_earlier_value():
    model = ReturnsFeatures()
    graph = model_graph(model, torch.randn(5, 4))
    names = [op.name for op in graph.ops]
    assert names == ["x", "a", "tanh", "b", "c", "tanh_1", "output"]
    stages = [Stage(name, tuple(getattr(model, name).parameters())) for name in "abc"]
    # Pass 2 updates b after a moved: a, tanh, b and the output depend on them; c and its tanh (saved by tanh's
    # backward, so kept from pass 1) do not.
    assert recompute_sets(graph, stages, [0, 1, 2])[1] == {names.index(n) for n in ("a", "tanh", "b", "output")}


class ScalesItsInputOnceMoved(nn.Linear):
    """Doubles its input in place once its weight has moved from where it started (a data-dependent in-place
    change: not in the first two passes of a step, in the third, where the chain engine feeds it a kept value)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.register_buffer("start", self.weight.detach().clone(), persistent=False)

    def forward(self, x):
        if not torch.equal(self.weight, self.start):
            x.mul_(2.0)  # x is the first Linear's output, which autograd does not save: allowed in a plain forward
        return super().forward(x)


def test_a_kept_value_a_chain_child_modifies_in_place_in_a_later_pass_only_equals_the_reference():
    """A chain's pass reads the value kept before the child of the stage that moved last as a non-leaf
    (``graph._non_leaf``), which a module may modify in place, as in the full forward (a leaf that requires grad
    may not be); its backward stops at stage k."""
    import backforward.graph as graph

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), ScalesItsInputOnceMoved(6, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["0", "1", "3"])
    fed = []
    real = graph._non_leaf
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graph, "_non_leaf", lambda t: fed.append(t.requires_grad) or real(t))
        for t in range(4):
            twins.step(x, y, seed=t)
    # Step 1 reads the stage order; step 2 finds the kept value modified in place (its later passes run whole);
    # in steps 3 and 4 the third pass reads it as a non-leaf, and the child doubles it in place.
    assert twins.bf._engine == "chain" and fed == [True] * 2


class Tagged(torch.Tensor):
    """A tensor subclass with Python-level ``__torch_function__`` only (the default)."""


class Tag(nn.Module):
    def forward(self, x):
        return x.as_subclass(Tagged)


class TagAware(nn.Linear):
    def forward(self, x):
        out = super().forward(x)
        return out * 2 if isinstance(x, Tagged) else out


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_a_tensor_subclass_kept_between_passes_keeps_its_type(order):
    """A kept value is fed back as the subclass it was (a built-in autograd node would hand back a plain
    tensor, and TagAware would compute something else)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Tag(), TagAware(6, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["0", "3", "5"])
    twins.bf.order = order
    twins.ref_stages = twins.ref_stages[::-1] if order == "reverse" else twins.ref_stages
    for t in range(4):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "chain"


def test_a_hook_that_backpropagates_through_its_modules_input_steps_exactly():
    """A forward hook calling backward() on a penalty of its module's input reaches the value kept between passes:
    it accumulates into the detached copy, which nothing reads (a node whose backward raises would fail here)."""

    def penalty(_module, inputs, _output):
        if torch.is_grad_enabled() and inputs[0].requires_grad:
            (1e-2 * inputs[0].pow(2).mean()).backward(retain_graph=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    twins = BesideReference(model, ["0", "2", "4"])
    for m in (model, twins.ref):
        m[2].register_forward_hook(penalty)
    for t in range(4):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "chain"


def test_the_gradients_a_fast_step_leaves_record_no_graph():
    """As after a plain backward: each stage's .grad is a plain tensor, with no graph of the gradient kept alive."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(2):
        opt.step_batch(x, y, F.cross_entropy)
    assert opt._engine == "chain"
    assert all(p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad for p in model.parameters())


class Peek(nn.Module):
    """Scales its input by the mean of another module's weight, reached through a plain list (outside the module
    tree, so not among its parameters): its value depends on that module's stage."""

    def __init__(self, other: nn.Module):
        super().__init__()
        self._other = [other]

    def forward(self, x):
        return x * self._other[0].weight.mean()


class CountingPeek(Peek):
    def __init__(self, other: nn.Module):
        super().__init__(other)
        self.calls = self._calls = 0  # a public and a private counter

    def forward(self, x):
        self.calls += 1
        self._calls += 1
        return super().forward(x)


class PeekingBlock(nn.Module):
    """Not a Sequential (traced by fx): a gate with a parameter of its own (called whole) that also reads the
    next layer's weight through a plain list."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.gate = PeekWithOwn(self.b)

    def forward(self, x):
        return self.head(torch.tanh(self.b(self.gate(self.a(x)))))


class PeekWithOwn(Peek):
    def __init__(self, other: nn.Module):
        super().__init__(other)
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return super().forward(x) * self.scale


def test_a_module_reading_another_modules_weight_outside_the_module_tree_is_recomputed_when_it_moves():
    """The chain's Peek owns no parameter but reads layer 2's weight: a pass after layer 2 moved must recompute
    it (the plan used to keep its stale value); found by one probe forward when the graph is read."""
    torch.manual_seed(0)
    first, second, last = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
    model = nn.Sequential(first, Peek(second), second, last)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    twins = BesideReference(model, ["0", "2", "3"])
    for t in range(3):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "chain"
    graph = next(iter(twins.bf._graphs.values()))
    assert graph.ops[2].params == (id(second.weight),)


def test_a_traced_module_reading_another_modules_weight_outside_the_module_tree_steps_exactly():
    """fx calls the gate whole (it owns a parameter); with the stages given in the order a, gate, b, head, the
    head's pass comes right after b moved and must recompute the gate, which reads b's weight."""
    torch.manual_seed(0)
    model = PeekingBlock()
    ref = clone(model, [])[0]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    names = ["a", "gate", "b", "head"]
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.5),
                      stages=[model.get_submodule(n) for n in names])
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_stages = [list(ref.get_submodule(n).parameters()) for n in names]
    for _ in range(3):
        reference_step(ref, ref_opt, ref_stages, lambda: backward(F.cross_entropy(ref(x), y)))
        opt.step_batch(x, y, F.cross_entropy)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    assert opt._engine == "graph"


def test_reading_which_parameters_each_op_reads_leaves_no_trace():
    """The probe forward puts back random numbers, buffers, the modules' plain attributes and gradients (a hook's
    backward in the forward, as an activation penalty's, would add into them), also where it then refuses."""
    torch.manual_seed(0)
    second = nn.Linear(6, 6)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), CountingPeek(second), second, nn.BatchNorm1d(6))
    second.register_forward_hook(activation_penalty)
    x = torch.randn(8, 4)
    buffers = [b.clone() for b in model.buffers()]
    model[0].weight.grad = torch.ones_like(model[0].weight)
    grads = [p.grad for p in model.parameters()]
    rng = torch.get_rng_state()
    with pytest.raises(Refusal, match=r"keeps state in attributes \(2\.calls, 2\._calls\)"):  # a count kept
        model_graph(model, x)
    assert model[2].calls == model[2]._calls == 0 and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))


@pytest.mark.parametrize("kind", ["chain", "graph"])
def test_reading_a_model_whose_hook_backpropagates_gives_no_gradient_to_a_parameter_not_held(kind):
    """The forwards that read the model (the check of a traced graph against forward(), the probe) run a child's
    hook that calls backward() outside any pass: what it adds is taken back, so the bias the optimizer does not
    hold keeps none, as in the reference."""
    model, ref, _, _, x, y = penalised_mlp_beside_reference("forward")
    stepped = model if kind == "chain" else Traced(model)
    opt = Backforward(stepped, torch.optim.SGD([p for p in model.parameters() if p is not model[0].bias], lr=0.1))
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p is not ref[0].bias], lr=0.1)
    engines = []
    for _ in range(3):
        reference_step(ref, ref_opt, [[ref[0].weight], list(ref[2].parameters()), list(ref[4].parameters())],
                       lambda: backward(F.cross_entropy(ref(x), y)))
        opt.step_batch(x, y, F.cross_entropy)
        engines.append(opt._engine)
        assert model[0].bias.grad is None
        assert_same_params(model, ref)
    assert engines == ["generic", kind, kind]


@pytest.mark.parametrize("kind", ["chain", "graph"])
def test_reading_the_graph_keeps_no_value_of_its_forward(kind):
    """Every output a step made is gone after the steps (the probe's saved-tensor hook must not hold what it
    sees: a sigmoid's output holding its own grad_fn is a cycle the garbage collector cannot see)."""
    outputs = []
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(4, 16), nn.Sigmoid(), nn.Linear(16, 3))
    chain[1].register_forward_hook(lambda _m, _a, out: outputs.append(weakref.ref(out)))  # called whole if traced
    model = chain if kind == "chain" else Traced(chain)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        opt.step_batch(x, y, F.cross_entropy)
    assert opt._engine == kind
    gc.collect()
    assert outputs and not [r for r in outputs if r() is not None]


class GradientFeature(nn.Module):
    """Appends d(sum tanh(v W))/dv to its input, by torch.func (as score or physics-informed features do); owning
    its parameter, it is one call in a traced graph."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x):
        gradient = torch.func.vmap(torch.func.grad(lambda v: torch.tanh(v @ self.weight).sum()))(x)
        return torch.cat([x, gradient], 1)


@pytest.mark.parametrize("kind", ["chain", "graph"])
def test_a_model_using_torch_func_in_its_forward_steps_exactly(kind):
    """torch.func refuses saved-tensor hooks: a chain's probe runs none (its values are not read), and a traced
    graph whose probe fails runs the generic engine, saying why in one line."""
    torch.manual_seed(0)
    chain = nn.Sequential(GradientFeature(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model = chain if kind == "chain" else Traced(chain)
    prefix = "" if kind == "chain" else "inner."
    twins = BesideReference(model, [f"{prefix}0", f"{prefix}1", f"{prefix}3"])
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    if kind == "chain":
        for t in range(3):
            twins.step(x, y, seed=t)
        assert twins.bf._engine == "chain"
    else:
        said = [m for m in fallback_warnings(twins, x, y, steps=3) if "backforward" in m]
        assert len(said) == 1 and "reading which values its backward saves fails: torch.func" in said[0]


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_a_forward_hook_that_backpropagates_in_step_batch_steps_exactly(order):
    """As in a closure: a backward() inside the forward (a hook's activation penalty) is the pass's, restricted to
    stage k; run by torch directly it would add into stages that move later in the step."""
    model, ref, ref_stages, ref_opt, x, y = penalised_mlp_beside_reference(order)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), order=order)
    engines = []
    for _ in range(3):
        reference_step(ref, ref_opt, ref_stages, lambda: backward(F.cross_entropy(ref(x), y)))
        opt.step_batch(x, y, F.cross_entropy)
        engines.append(opt._engine)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    assert engines == ["generic", "chain", "chain"]


class Gated(nn.Module):
    """Keeps an auxiliary loss and the last activations in attributes (a balance term, a logged map)."""

    def __init__(self):
        super().__init__()
        self.a, self.gate, self.b = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        weights = torch.softmax(self.gate(h), dim=-1)
        self.aux = (weights.mean(0) ** 2).sum()
        self.last = h.detach()
        return self.b(h * weights)


def test_a_forward_setting_attributes_the_loss_reads_is_not_traced():
    """A traced graph records calls, not assignments: the loss would read the auxiliary term of the step before.
    Refused; the generic engine sets them as the reference does (the last pass's)."""
    torch.manual_seed(0)
    model = Gated()
    twins = BesideReference(model, ["a", "gate", "b"])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    said = []
    for t in range(3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(t)
            reference_step(twins.ref, twins.ref_opt, twins.ref_stages,
                           lambda: backward(F.cross_entropy(twins.ref(x), y) + 0.1 * twins.ref.aux))
            torch.manual_seed(t)
            twins.bf.step_batch(x, y, lambda out, target: F.cross_entropy(out, target) + 0.1 * model.aux)
        said += [str(w.message) for w in caught]
        assert_same_params(model, twins.ref)
        assert torch.equal(model.last, twins.ref.last)
    assert twins.bf._engine == "generic"
    assert said == ["backforward: step_batch runs the generic engine on Gated: its forward sets attributes "
                    "(aux, last), which a traced graph would not set"]


class Holder(nn.Module):
    """A module holding one attribute ``a``: what its settings see of it."""


class StringSlot:
    __slots__ = "scale"

    def __init__(self):
        self.scale = 1.0


class TwoSlots:
    __slots__ = ("_cache", "rate", "scale")

    def __init__(self):
        self.scale, self._cache = 1.0, 0  # rate left unset


SETTING_CHANGES = {  # name: (value, change, whether the module's settings see the change)
    "numpy, 64 values, one changed": (lambda: np.zeros(64), lambda h: h.a.__setitem__(0, 1), True),
    "numpy, 65 values, one changed": (lambda: np.zeros(65), lambda h: h.a.__setitem__(0, 1), False),
    "numpy, 65 values, rebound": (lambda: np.zeros(65), lambda h: setattr(h, "a", np.zeros(65)), True),
    "numpy, another dtype": (lambda: np.zeros(1, np.int32), lambda h: setattr(h, "a", np.zeros(1, np.float32)),
                             True),
    "numpy, a scalar for an array": (lambda: np.float32(0), lambda h: setattr(h, "a", np.zeros((), np.float32)),
                                     True),
    "array.array, not a setting": (lambda: array.array("i", [1]), lambda h: h.a.__setitem__(0, 2), False),
    "fraction": (lambda: fractions.Fraction(1, 3), lambda h: setattr(h, "a", fractions.Fraction(1, 2)), True),
    "decimal": (lambda: decimal.Decimal("0.1"), lambda h: setattr(h, "a", decimal.Decimal("0.2")), True),
    "slice": (lambda: slice(0, 3), lambda h: setattr(h, "a", slice(0, 4)), True),
    "three levels down": (lambda: [[[1]]], lambda h: h.a[0][0].__setitem__(0, 2), True),
    "four levels down": (lambda: [[[[1]]]], lambda h: h.a[0][0][0].__setitem__(0, 2), False),
    "64 items, one changed": (lambda: list(range(64)), lambda h: h.a.__setitem__(0, -1), True),
    "65 items, one changed": (lambda: list(range(65)), lambda h: h.a.__setitem__(0, -1), False),
    "65 items, rebound": (lambda: list(range(65)), lambda h: setattr(h, "a", list(range(65))), True),
    "a set": (lambda: {1, 2}, lambda h: setattr(h, "a", {1, 3}), True),
    "a frozenset for a set": (lambda: {1, 2}, lambda h: setattr(h, "a", frozenset({1, 2})), True),
    "a tuple for a list": (lambda: [1, 2], lambda h: setattr(h, "a", (1, 2)), True),
    "a namespace's private": (lambda: types.SimpleNamespace(x=1, _cache=1), lambda h: setattr(h.a, "_cache", 2),
                              False),
    "a slot named by a string": (StringSlot, lambda h: setattr(h.a, "scale", 2.0), True),
    "a slot, another unset": (TwoSlots, lambda h: setattr(h.a, "scale", 2.0), True),
    "a private slot": (TwoSlots, lambda h: setattr(h.a, "_cache", 1), False),
}


@pytest.mark.parametrize("name", list(SETTING_CHANGES))
def test_what_a_modules_settings_see_of_a_change(name):
    """Worked out from the rule: numbers and small containers by value (three levels down, 64 across), larger
    ones by identity, private attributes and what is no setting not at all."""
    make, change, seen = SETTING_CHANGES[name]
    holder = Holder()
    holder.a = make()
    before = settings_of(holder, chain=False)
    change(holder)
    assert (settings_of(holder, chain=False) != before) == seen


class RegistersScratch(nn.Module):
    """Registers a non-persistent buffer on its first call."""

    def forward(self, x):
        if "scratch" not in self._buffers:
            self.register_buffer("scratch", x.detach().mean(0), persistent=False)
        return x - self.scratch


def test_reading_a_model_leaves_no_buffer_its_forward_registers():
    model = nn.Sequential(nn.Linear(4, 4), RegistersScratch(), nn.Linear(4, 3))
    model_graph(model, torch.randn(5, 4))
    assert dict(model[1]._buffers) == {} and model[1]._non_persistent_buffers_set == set()


def test_a_hook_added_later_to_the_root_has_the_model_read_again_and_refused():
    """A chain calls its children: a hook on the root would not fire; read again, it is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    twins = BesideReference(model, ["0", "2"])
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for t in range(3):
        twins.step(x, y, seed=t)
    assert twins.bf._engine == "chain"
    for m in (model, twins.ref):
        m.register_forward_hook(lambda module, args, out: out * 2)
    said = fallback_warnings(twins, x, y)
    assert len(said) == 1 and "the model has forward hooks" in said[0]


def test_graphs_let_go_take_their_engines_with_them():
    """Explicit stages on a chain: each new graph gets its engine at once; a rate changed every step reads the
    model every step; the engines kept are those of the graphs kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Scales(), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), stages=[model[0], model[3]])
    for t in range(12):
        model[1].rate = 1.0 + 0.01 * t
        bf.step_batch(x, y, F.cross_entropy)
        assert bf._engine == "chain"
    kept = [g for g in bf._graphs.values()]
    assert len(kept) == 8 and {id(e.graph) for e in bf._plan.engines.values()} <= {id(g) for g in kept}
    assert len(bf._plan.engines) == 8
