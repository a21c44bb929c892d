"""The fast engine: pass k recomputes only what depends on a stage that moved, for any model it can read as a graph.

A model's forward is read as a graph of calls (``ModelGraph``): an ``nn.Sequential`` as the
chain of its children, any other model by ``torch.fx`` symbolic tracing. Each call is a
node; a node *depends on* a stage if it uses that stage's parameters (its own, or any it
reads through a reference outside the module tree, which one probe forward records) or reads
a node that does. In pass j (updating stage k = order[j]; stage order[j-1] moved just before) a node
is recomputed if it depends on order[j-1] (its value is stale) or on order[j] (its graph
carries stage k's gradient); every other value is the one the latest pass computed, kept
detached and fed back with its ``requires_grad`` flag, so the backward stops at stage k.
What a later pass reads is kept from the pass that computed it last and dropped after its
last read. On a chain this is the paper's prefix cache: pass k starts at stage k-1.

The same function in every pass:

- Random numbers: before each run of consecutive recomputed nodes the generator is set to
  where the pass that last evaluated that node stood before it, so dropout draws the masks
  of pass 1, and a count of draws that depends on the data (RReLU's) is the one a plain pass
  would draw (the nodes before it drew as when they last ran; on a traced graph, unless a
  pass in between recomputed a branch before it).
- Buffers: nodes that touch the same buffer (a module called twice) are recomputed
  together, so a node never reads a buffer state an unrecomputed node would have written;
  and a node touching a buffer depends on what the nodes touching it before depend on (a
  running statistic read after the call that updates it).
- In-place operations: a kept value that a module modified in place is caught by its
  version counter; that step then recomputes every node, and from then on that value is
  kept as a copy, and handed out as a copy to a pass that is not its last reader.

Why ``torch.fx`` and not ``torch.export``: fx records calls to the model's own modules
and functions, so every node runs exactly what the plain forward runs (the same module
objects, kernels chosen by the same ``requires_grad`` flags, hooks of called modules
firing). ``torch.export`` functionalises and decomposes the forward into ATen operators,
a different program that in-place semantics, kernel choice and module hooks do not
survive. Tracing is refused (and the generic engine used) where a traced graph could
differ from the forward: a forward that changes grad mode, autocast or saved-tensor hooks
inside (``torch.no_grad``, reentrant checkpointing), draws random numbers from no tensor, has
hooks on the root, or whose graph does not reproduce ``forward()`` on the first batch.
Modules from ``torch.nn`` and modules that own parameters, buffers or hooks are called
whole; only plain containers are traced through. Some calls fx cannot trace are recorded
whole too (``_RecordedWhole``: factories given a traced size, non-reentrant checkpoints,
custom autograd Functions).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import math
import operator
import sys
import threading
import types
import warnings
from collections.abc import Callable, Collection, Sequence
from copy import copy as shallow_copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import fx, nn
from torch.nn.modules import module as _module
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .engines import RunPass, StageGradients
from .replay import BufferValues, RngState, buffer_slots, copy_back, rng_restore, rng_snapshot, same_values
from .stages import Stage

Env = list[Any]


@dataclass
class Op:
    """One node of a model's forward: how to evaluate it from the values before it, and what it uses."""

    name: str
    evaluate: Callable[[Env], Any]
    reads: tuple[int, ...] = ()
    params: tuple[int, ...] = ()    # id() of parameters it uses itself (owned, or reached outside the module tree)
    buffers: tuple[int, ...] = ()   # id() of buffers it reads or writes itself
    free: bool = False              # an input or attribute lookup: evaluated whenever read, never kept
    module: nn.Module | None = None  # the module it calls, if it calls one
    constants: tuple[torch.Tensor, ...] = ()  # tensors a traced call holds, made while tracing: every call's


@dataclass
class ModelGraph:
    """A model's forward as ops in execution order: inputs first, the output last."""

    ops: list[Op]
    kind: str                       # "chain" (an nn.Sequential's children) or "graph" (traced by fx)
    volatile: set[int] = field(default_factory=set)  # ops whose value a module modifies in place: never kept
    saved: frozenset[int] | None = None  # ops whose value autograd saves anyway (or the batch's); None: unknown


class Refusal(Exception):
    """Why a model cannot be read as a graph (one line)."""


def plain_sequential(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward


def model_graph(model: nn.Module, example: Any) -> ModelGraph:
    """The graph of ``model``'s forward: its children for a plain ``nn.Sequential``, else traced by fx."""
    if model._forward_hooks or model._forward_pre_hooks:
        raise Refusal("the model has forward hooks, which a graph of its calls would not fire")
    if global_hooks():
        raise Refusal("global module forward hooks are registered; a graph of calls would not fire them all")
    with _READING:
        graph = chain_graph(model) if plain_sequential(model) else traced_graph(model, example)
        probe(model, graph, example)
    return graph


# fx and _RecordedWhole patch torch (nn.Module.__call__, torch.ones, ...) while they trace, and a reading's forwards
# must not meet another's patches: one reading at a time (models stepped in several threads). Modules other
# threads call meanwhile meet fx's patches all the same (README).
_READING = threading.RLock()


def chain_graph(model: nn.Sequential) -> ModelGraph:
    """Input, each child called on the value before it, output."""
    ops = [Op("input", _never, free=True)]
    for i, child in enumerate(model, start=1):
        ops.append(Op(str(i - 1), lambda env, c=child, i=i: c(env[i - 1]), (i - 1,), _ids(child.parameters()),
                      _ids(child.buffers()), module=child))
    last = len(ops) - 1
    ops.append(Op("output", lambda env: env[last], (last,)))
    return ModelGraph(ops, "chain")


# ---- tracing ----

class _Reading:
    """Around forwards run to read the model (tracing, the check against ``forward()``, the probe): puts back
    what they change, as it was: random numbers, buffers, gradients (a hook's ``backward()`` in the forward, as
    an activation penalty's, would add into them; they are none meanwhile), parameters a forward changes in
    place (a copy of each is held meanwhile: ``.data`` changes bump no version counter, so values are compared)
    and the modules' own attributes (each rebound to what it held; a tensor's values, a container's items and
    the tensors among them, a generator's state put back; attributes and buffers the forward added, such as a
    cache tracing filled with a proxy, removed).
    ``state_kept()`` names the attributes that hold state a forward keeps, which a pass that does not call its
    module would not advance. State kept elsewhere (globals, class attributes, other objects, hooks' closures)
    is not seen."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> _Reading:
        self.rng, self.buffers = rng_snapshot(), BufferValues(list(self.model.modules()))
        self.grads = [(p, p.grad) for p in self.model.parameters()]
        self.parameters = [(name, p, p.detach().clone()) for name, p in self.model.named_parameters()]
        # Names of buffers a forward registers as non-persistent (the buffers themselves: BufferValues).
        self.non_persistent = [(m, set(m._non_persistent_buffers_set)) for m in self.model.modules()]
        self.attributes = {name: (m, {key: _held(value) for key, value in _own_attributes(m).items()})
                           for name, m in self.model.named_modules()}
        for p, _ in self.grads:
            p.grad = None
        return self

    def state_kept(self, forward: Callable[[], object]) -> list[str]:
        """The attributes the forwards so far changed that one more ``forward()``, from the same random numbers
        and buffers, changes again (an attribute each call sets anew from its inputs, parameters and buffers, as
        legacy ``spectral_norm``'s weight, keeps no state)."""
        changed = self._changed()
        moved = [f"{name} (a parameter, changed in place)" for name, _, _ in self._moved()]
        if not changed:
            return moved
        first = {(name, key): _held(getattr(m, key, _ABSENT)) for name, m, key in changed}
        self.put_back()
        try:
            forward()
        except Exception:  # noqa: BLE001 - a forward that fails when its state has advanced: state, all of it
            again = changed
        else:
            again = [(name, m, key) for name, m, key in changed
                     if not _alike(getattr(m, key, _ABSENT), first[(name, key)])]
        return moved + [_dotted(name, key) for name, _, key in again]

    def written(self) -> list[str]:
        """The attributes the forwards so far set (rebound, changed inside, added or deleted)."""
        return [_dotted(name, key) for name, _, key in self._changed()]

    def _changed(self) -> list[tuple[str, nn.Module, str]]:
        return [(name, m, key) for name, (m, before) in self.attributes.items()
                for key in dict.fromkeys([*_own_attributes(m), *before])  # in the module's order
                if not _unchanged(getattr(m, key, _ABSENT), before.get(key))]

    def _moved(self) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
        """The parameters a forward changed in place (name, parameter, value before)."""
        return [(name, p, value) for name, p, value in self.parameters if not same_values(p.detach(), value)]

    def put_back(self) -> None:
        """Random numbers and buffers as they were (between two forwards of one reading)."""
        rng_restore(self.rng)
        self.buffers.put_back()

    def __exit__(self, *exc: object) -> None:
        self.put_back()
        for m, non_persistent in self.non_persistent:  # the buffers themselves: put back above (BufferValues)
            if m._non_persistent_buffers_set != non_persistent:
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(non_persistent)
        for p, g in self.grads:
            p.grad = g
        for _, p, value in self._moved():
            copy_back(p, value)
        for m, before in self.attributes.values():
            attributes = vars(m)
            for key in _own_attributes(m).keys() - before.keys():
                del attributes[key]
            for key, held in before.items():
                attributes[key] = held.value
                held.put_back()


def _dotted(module_name: str, key: str) -> str:
    return f"{module_name}.{key}" if module_name else key


_ABSENT = object()
_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # a module's own bookkeeping: parameters, buffers, hooks, mode
_CONTAINERS = (list, dict, set, collections.deque)


def _own_attributes(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if k not in _MODULE_INTERNALS}


@dataclass
class _Held:
    """An attribute's value and what a forward could change inside it without rebinding it: a tensor's version
    and a copy of its values (none where it cannot be copied), a container's items (each held in turn, three
    levels down: a cycle ends there), a generator's state."""

    value: Any
    version: int | None = None
    values: Any = None
    items: list[_Held] | None = None

    def put_back(self) -> None:
        value = self.value
        if isinstance(value, torch.Tensor):
            if self.values is not None and _version(value) != self.version:
                with contextlib.suppress(RuntimeError):  # a view that cannot be written (its buffer is put back)
                    copy_back(value, self.values)
        elif isinstance(value, list):  # not compared first: an item's __eq__ may be a proxy's, or a tensor's
            value[:] = self.values
        elif isinstance(value, collections.deque):
            value.clear()
            value.extend(self.values)
        elif isinstance(value, (dict, set)):
            value.clear()
            value.update(self.values)
        elif isinstance(value, torch.Generator):
            value.set_state(self.values)
        for item in self.items or ():
            item.put_back()


def _held(value: Any, *, depth: int = 3) -> _Held:
    if isinstance(value, nn.Parameter):  # a reference to one (a list of flat weights): the step's to restore
        return _Held(value, _version(value))
    if isinstance(value, torch.Tensor):
        try:
            copy = value.detach().clone()
        except Exception:  # noqa: BLE001 - a tensor that cannot be copied (meta, say): not put back in place
            copy = None
        return _Held(value, _version(value), copy)
    if isinstance(value, _CONTAINERS):
        members = list(value.values()) if isinstance(value, dict) else list(value)
        return _Held(value, values=shallow_copy(value),
                     items=[_held(m, depth=depth - 1) for m in members] if depth > 0 else None)
    if isinstance(value, torch.Generator):  # a module's own random numbers
        return _Held(value, values=value.get_state())
    return _Held(value)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: no version, and no change in place outside inference mode
        return None


def _unchanged(value: Any, held: _Held | None) -> bool:
    """Whether an attribute still holds what ``held`` recorded: the same object, unchanged inside (a number, a
    string: an equal one)."""
    if held is None:
        return value is _ABSENT
    old = held.value
    if isinstance(old, (bool, int, float, str)):
        return _equal_objects(value, old)
    if value is not old:
        return False
    if isinstance(old, torch.Tensor):
        return _version(old) == held.version
    if isinstance(old, _CONTAINERS):
        return _same_members(old, held.values) and all(_unchanged(item.value, item) for item in held.items or ())
    if isinstance(old, torch.Generator):
        return torch.equal(old.get_state(), held.values)
    return True


def _alike(value: Any, held: _Held) -> bool:
    """Whether an attribute holds what ``held`` recorded or an equal value made anew (a tensor of the same
    values; a container of alike items; deeper than ``held`` looked, not known alike)."""
    old = held.value
    if isinstance(old, torch.Tensor):
        if value is old and _version(value) == held.version:
            return True
        return isinstance(value, torch.Tensor) and held.values is not None and _equal_values(value, held.values)
    if isinstance(old, _CONTAINERS):
        if type(value) is not type(old) or len(value) != len(held.values or ()) or held.items is None:
            return False
        if isinstance(value, dict) and value.keys() != held.values.keys():
            return False
        if isinstance(value, set):
            return _equal_objects(value, held.values)
        members = value.values() if isinstance(value, dict) else value
        return all(_alike(m, item) for m, item in zip(members, held.items, strict=True))
    if isinstance(old, torch.Generator):
        return isinstance(value, torch.Generator) and torch.equal(value.get_state(), held.values)
    return _equal_objects(value, old)


def _same_members(a: Any, b: Any) -> bool:
    """The same items, by identity (a dict: the same keys too)."""
    if len(a) != len(b):
        return False
    if isinstance(a, set):
        return a == b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    return all(x is y for x, y in zip(a, b, strict=True))


def _equal_objects(a: Any, b: Any) -> bool:
    """Equal by ``==`` where it answers plainly (NaN equal to NaN; an array's answer taken whole); else only the
    same object."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        same = a == b
        return same if isinstance(same, bool) else bool(same.all())
    except Exception:  # noqa: BLE001 - no plain answer (a proxy, a tensor's ambiguity, a cycle): not known equal
        return False


def _equal_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.dtype == b.dtype and same_values(a, b)
    except Exception:  # noqa: BLE001 - no kernel to compare them (sparse, meta): count them as different
        return False


def traced_graph(model: nn.Module, example: Any) -> ModelGraph:
    with _Reading(model) as reading:  # tracing runs forward, on proxies
        try:
            with warnings.catch_warnings():  # a forward run on proxies warns about things that are not so
                warnings.simplefilter("ignore")
                graph = _Tracer(model).trace(model)
        except Refusal:
            raise
        except Exception as e:  # fx raises many kinds; the message says which construct it cannot trace
            raise Refusal(f"torch.fx cannot trace it: {_first_line(e)}") from None
        drew = not torch.equal(reading.rng[0], torch.get_rng_state())
        moved = reading.buffers.changed()
        written = reading.written()
    if written:  # fx records calls, not attribute assignments: the attributes would keep their values
        raise Refusal(f"its forward sets attributes ({', '.join(written)}), which a traced graph would not set")
    if drew:
        raise Refusal("its forward draws random numbers from no tensor input, which tracing would fix at one value")
    if moved:
        raise Refusal("its forward changes a buffer by calls on the buffer itself, which tracing runs once instead "
                      "of recording")
    try:
        result = _from_fx(model, graph)
    except Refusal:
        raise
    except Exception as e:  # a graph fx made but that does not read as calls (a forward returning the module)
        raise Refusal(f"torch.fx's graph of it cannot be read as calls: {_first_line(e)}") from None
    _check_same_forward(model, result, example)
    return result


class _Tracer(fx.Tracer):
    """Calls ``torch.nn`` modules and modules owning parameters, buffers or hooks whole; records ``x += y``
    as the in-place call it is; keeps tensor constants in the graph instead of on the model; records whole
    the calls ``_RecordedWhole`` lists, given traced values."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.proxy_buffer_attributes = True  # an expression on a buffer is recomputed, not fixed at tracing's value
        self.ambient = _ambient()
        self.buffer_ids = {id(b) for b in model.buffers()}

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self.started = sys._getframe()
        with _RecordedWhole(self, self.model):
            return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        owns = any(p is not None for p in m._parameters.values()) or any(b is not None for b in m._buffers.values())
        return super().is_leaf_module(m, qualname) or owns or bool(m._forward_hooks or m._forward_pre_hooks)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # type: ignore[no-untyped-def]
        if _ambient() != self.ambient:
            raise Refusal("its forward changes grad mode, autocast or saved-tensor hooks inside (torch.no_grad, "
                          "torch.autocast, checkpointing), which tracing would drop")
        if _inside_function_apply(self.started):
            raise Refusal("its forward runs a custom autograd Function on traced values through a name not "
                          "looked up on the class as it runs (f = MyFunction.apply kept on an object), which "
                          "tracing would trace through, dropping its backward")
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def create_arg(self, a: Any) -> Any:
        if (isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and id(a) not in self.buffer_ids
                and self.tensor_attrs.get(a) is None):
            if a.requires_grad:
                raise Refusal("its forward computes a value from parameters outside the calls tracing records "
                              "(e.g. iterating self.parameters()), which tracing would fix at one value")
            return a  # a tensor made at trace time without tensor inputs: the same constant in every call
        if isinstance(a, _FUNCTIONS):  # a function a call recorded whole takes (checkpoint's)
            return a
        return super().create_arg(a)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


class _RecordedWhole:
    """While tracing, calls fx cannot trace but that compute the same from the same values, recorded as one
    node each (called as usual otherwise):

    - factories given a traced size or device (``torch.tril(torch.ones(T, T, device=x.device))``, a causal
      mask: fx's proxies are no integers, so the call itself would fail), called in the thread that traces (of
      fixed sizes, one is made while tracing: a constant of the graph, which ``_InPlaceChanges`` watches);
    - ``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False)`` given traced values: run whole, it
      recomputes inside the backward as in ``forward()`` (a reentrant one hides its parameters from the graph
      and stays refused, as does a function holding traced values, which the recorded call would hold as
      proxies);
    - ``SomeFunction.apply(...)`` of a custom ``torch.autograd.Function`` given traced values (tracing would
      run its forward on proxies).

    Found as attributes (``torch.ones``) and as names a module's forward imported (``from torch import
    ones``). What such a call reads (parameters, buffers) the probe records, as for any call.
    """

    FACTORIES = ("ones", "zeros", "empty", "full", "arange", "linspace", "logspace", "eye", "tril_indices",
                 "triu_indices")

    def __init__(self, tracer: fx.Tracer, model: nn.Module):
        self.tracer = tracer
        self.model = model
        self.thread = threading.get_ident()  # only the forward being traced makes proxies; other threads' calls run
        self.patched: list[tuple[dict[str, Any], str, Any]] = []

    def __enter__(self) -> None:
        try:
            self._patch_all()
        except BaseException:
            self.__exit__()
            raise

    def _patch_all(self) -> None:
        wrappers = {id(fn): self._whole(fn, _traced) for fn in (getattr(torch, name) for name in self.FACTORIES)}
        checkpoint = torch.utils.checkpoint.checkpoint
        wrappers[id(checkpoint)] = self._whole(checkpoint, _checkpoint_recordable)
        namespaces = [vars(torch), vars(torch.utils.checkpoint)]
        for m in self.model.modules():
            found = getattr(getattr(m, "forward", None), "__globals__", None)
            if found is not None and all(found is not n for n in namespaces):
                namespaces.append(found)
        apply = vars(torch.autograd.Function)["apply"].__func__

        def applied(fn_cls: type, *args: Any, **kwargs: Any) -> Any:
            bound = apply.__get__(fn_cls)  # what ``fn_cls.apply`` is outside tracing
            if (fn_cls is not torch.utils.checkpoint.CheckpointFunction and threading.get_ident() == self.thread
                    and _traced(args, kwargs)):
                return self._record(bound, args, kwargs)
            return bound(*args, **kwargs)

        for namespace in namespaces:
            for name, value in list(namespace.items()):
                if callable(value) and id(value) in wrappers:
                    self._patch(namespace, name, wrappers[id(value)])
                elif isinstance(value, types.MethodType) and value.__func__ is apply:  # ``f = MyFunction.apply``
                    self._patch(namespace, name, functools.partial(applied, value.__self__))

        self.patched.append((torch.autograd.Function, "apply", vars(torch.autograd.Function)["apply"]))
        torch.autograd.Function.apply = classmethod(applied)  # type: ignore[method-assign,assignment]

    def __exit__(self, *exc: object) -> None:
        for owner, name, value in reversed(self.patched):
            if isinstance(owner, dict):
                owner[name] = value
            else:
                setattr(owner, name, value)
        self.patched.clear()

    def _patch(self, namespace: dict[str, Any], name: str, value: Any) -> None:
        self.patched.append((namespace, name, namespace[name]))
        namespace[name] = value

    def _whole(self, fn: Callable[..., Any], recordable: Callable[[tuple, dict], bool]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == self.thread and recordable(args, kwargs):
                return self._record(fn, args, kwargs)
            return fn(*args, **kwargs)

        return call

    def _record(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return self.tracer.create_proxy("call_function", fn, args, kwargs)


_APPLY = vars(torch.autograd.Function)["apply"].__func__  # torch's, before anything patches it


def _inside_function_apply(started: Any) -> bool:
    """Whether a custom Function's ``apply`` (torch's, not the recording one) is running, above ``started``."""
    frame = sys._getframe(2)
    while frame is not None and frame is not started:
        if frame.f_code is _APPLY.__code__:
            return True
        frame = frame.f_back
    return False


def _traced(args: tuple, kwargs: dict) -> bool:
    return _holding((args, kwargs), (fx.Proxy,))


def _holding(value: Any, kinds: tuple[type, ...]) -> bool:
    """Whether ``value`` (or a tuple, list, dict or slice in it) holds an instance of ``kinds``."""
    found = False

    def look(a: Any) -> Any:
        nonlocal found
        found = found or isinstance(a, kinds)
        return a

    fx.node.map_aggregate(value, look)
    return found


def _checkpoint_recordable(args: tuple, kwargs: dict) -> bool:
    """Non-reentrant, and its function a module, a module's method, or a function (maybe in partials) holding
    no traced value or tensor (in its closure's cells, its defaults, a partial's arguments: a tensor made while
    tracing would be every call's)."""
    if kwargs.get("use_reentrant") is not False or not _traced(args, kwargs):
        return False
    fn = args[0]
    held: list[Any] = []
    while isinstance(fn, functools.partial):
        held += [*fn.args, *fn.keywords.values()]
        fn = fn.func
    if isinstance(fn, types.MethodType) and isinstance(fn.__self__, nn.Module):
        fn = fn.__func__
    elif not isinstance(fn, nn.Module):
        if not isinstance(fn, types.FunctionType):  # another callable object: what it holds is not known
            return False
        held += [cell.cell_contents for cell in fn.__closure__ or () if _filled(cell)]
        held += [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()]
    return not _holding(tuple(held), (fx.Proxy, torch.Tensor))


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


class _Proxy(fx.Proxy):
    """fx's Proxy records ``x += y`` as ``x = x + y``; a tensor adds in place, and so must the graph."""

    def _inplace(self, op: Callable[[Any, Any], Any], other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})


_INPLACE_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift",
                      "rshift")
for _name in _INPLACE_OPERATORS:
    setattr(_Proxy, f"__i{_name}__", functools.partialmethod(_Proxy._inplace, getattr(operator, f"i{_name}")))

_INPLACE_FUNCTIONS = {getattr(operator, f"i{name}") for name in _INPLACE_OPERATORS} | {operator.setitem,
                                                                                    operator.delitem}
_INPLACE_DUNDERS = {f"__i{name}__" for name in _INPLACE_OPERATORS} | {"__setitem__", "__delitem__"}


def _modifies_first_argument(model: nn.Module, node: fx.Node) -> bool:
    """Whether the call changes its first argument in place (``x.relu_()``, ``x += y``, ``inplace=True``,
    ``x.__setitem__(i, v)``, ``torch._foreach_mul_([x], 2)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(model.get_submodule(str(node.target)), "inplace", False) is True
    if node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
        return node.target in _INPLACE_FUNCTIONS  # operator.and_ and or_ (``a & b``) end with "_" but make a new value
    if node.op in ("call_method", "call_function"):
        name = _call_name(node)
        # A trailing "_" marks torch's in-place functions, private ones too; dunders (``__and__``) make new values.
        return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))
    return False


def _call_name(node: fx.Node) -> str:
    """The method's or function's name (``add_``, ``view``, ``relu``)."""
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")


def _may_alias_its_input(model: nn.Module, node: fx.Node) -> bool:
    """Whether the value may share memory with the call's first argument (a view: ``x[:, :2]``, ``x.view()``;
    ``x.add_()``'s result; a parameter-free module such as ``nn.Flatten``), as torch's schemas say; a call
    torch does not know counts as one that may."""
    if node.op == "call_module":
        return not any(True for _ in model.get_submodule(str(node.target)).parameters())
    if node.op not in ("call_method", "call_function"):
        return False
    if node.target is operator.getitem:
        return True
    packet = getattr(torch.ops.aten, _call_name(node), None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return True
    return any(r.alias_info is not None for o in packet.overloads() if o != "out" and not o.endswith("_out")
               for r in getattr(packet, o)._schema.returns)


def _refuse_shared_inplace(model: nn.Module, graph: fx.Graph) -> None:
    """A value changed in place while another op also reads it, itself or a value it may be a view of: which
    value each reader sees depends on their order in time, which a graph of values does not record."""
    for node in graph.nodes:
        if not node.args or not _modifies_first_argument(model, node):
            continue
        first = node.args[0]
        for value in (first if isinstance(first, (list, tuple)) else (first,)):
            while isinstance(value, fx.Node):
                if len(value.users) > 1:
                    raise Refusal(f"{node.name} changes {value.name} in place while other operations read it too, "
                                  "which a graph of values cannot order")
                value = value.args[0] if value.args and _may_alias_its_input(model, value) else None


def _from_fx(model: nn.Module, graph: fx.Graph) -> ModelGraph:
    _refuse_shared_inplace(model, graph)
    index: dict[fx.Node, int] = {}
    ops: list[Op] = []
    viewing: dict[int, tuple[int, ...]] = {}  # value -> the buffers it may be, or view (``.data``, ``.view()``)
    for node in graph.nodes:
        i = len(ops)  # fx puts the placeholders first: op 0 is the input, the others must have defaults
        reads = tuple(index[n] for n in node.all_input_nodes)
        args = fx.node.map_arg(node.args, lambda n: _Ref(index[n]))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: _Ref(index[n]))
        if node.op == "placeholder":
            if str(node.target).startswith("*"):
                raise Refusal(f"its forward takes {node.target}; step_batch passes one input")
            if i > 0 and not node.args:
                raise Refusal(f"its forward needs argument {node.target!r} besides the input")
            op = Op(node.name, _never if i == 0 else (lambda env, d=node.args[0]: d), free=True)
        elif node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            module = model.get_submodule(owner)
            value = getattr(module, attr)
            params = (id(value),) if isinstance(value, nn.Parameter) else ()
            buffers = (id(value),) if attr in module._buffers else ()
            op = Op(node.name, lambda env, m=module, a=attr: getattr(m, a), params=params, buffers=buffers, free=True)
        elif node.op == "call_module":
            module = model.get_submodule(str(node.target))
            params, buffers = _ids(module.parameters()), _ids(module.buffers())
            op = Op(str(node.target), _caller(module, args, kwargs), reads, params, buffers, module=module)
        elif node.op == "call_function":
            op = Op(node.name, _caller(node.target, args, kwargs), reads)
        elif node.op == "call_method":
            op = Op(node.name, _caller(_method(str(node.target)), args, kwargs), reads)
        else:  # output
            op = Op(node.name, lambda env, a=args[0]: _load(a, env), reads)
        # A node that reads a buffer through an attribute lookup, or a view of one, touches that buffer.
        op.buffers = op.buffers + tuple(b for r in reads for b in viewing.get(r, ()) if b not in op.buffers)
        if node.op == "get_attr":
            viewing[i] = op.buffers
        elif node.args and isinstance(node.args[0], fx.Node) and _may_alias_its_input(model, node):
            viewing[i] = viewing.get(index[node.args[0]], ())
        op.constants = tuple(t for t in pytree.tree_leaves((node.args, dict(node.kwargs)))
                             if isinstance(t, torch.Tensor))
        index[node] = i
        ops.append(op)
    return ModelGraph(ops, "graph")


@dataclass(frozen=True)
class _Ref:
    index: int


def _load(arg: Any, env: Env) -> Any:
    if type(arg) is _Ref:
        return env[arg.index]
    if isinstance(arg, (tuple, list, dict, slice)):
        return _plain(fx.node.map_aggregate(arg, lambda a: env[a.index] if type(a) is _Ref else a))
    return arg


def _plain(value: Any) -> Any:
    """fx's immutable lists and dicts as the lists and dicts the forward built."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    return value


def _caller(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Callable[[Env], Any]:
    if not kwargs and all(type(a) is _Ref for a in args):  # the common case, kept fast
        slots = tuple(a.index for a in args)
        return lambda env: fn(*[env[s] for s in slots])
    return lambda env: fn(*_load(args, env), **_load(kwargs, env))


def _method(name: str) -> Callable[..., Any]:
    return lambda obj, *args, **kwargs: getattr(obj, name)(*args, **kwargs)


def _check_same_forward(model: nn.Module, graph: ModelGraph, example: Any) -> None:
    """The traced graph must give what ``forward()`` gives on this batch, bit for bit (tracing fixes Python
    branches, e.g. on ``isinstance``, at the values it saw), and ``forward()`` must keep no state in the
    modules' attributes, which the graph would not."""
    detach = functools.partial(pytree.tree_map_only, torch.Tensor, torch.Tensor.detach)  # let each graph go
    fresh = functools.partial(pytree.tree_map_only, torch.Tensor, torch.Tensor.clone)  # the batch stays as it is
    with _Reading(model) as reading:
        plain = detach(model(fresh(example)))
        _refuse_state_kept_by_hand(reading, lambda: model(fresh(example)))
        reading.put_back()
        try:
            traced = detach(_run_whole(graph, fresh(example)))
        except Exception as e:  # e.g. a branch on an argument's default that tracing took the other way
            raise Refusal(f"its traced graph fails on the first batch ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no message'}), where forward() does not") from e
    a, spec_a = pytree.tree_flatten(plain)
    b, spec_b = pytree.tree_flatten(traced)
    same = spec_a == spec_b and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        for x, y in zip(a, b, strict=True))
    if not same:
        raise Refusal("its traced graph does not compute what forward() computes on the first batch "
                      "(a Python branch that tracing fixed)")


class _Reads(TorchFunctionMode):
    """Records which of ``tensors`` (the ids of the model's parameters and buffers) the torch functions called
    get as arguments: any use of one begins with one such call on it (an op, a method, an attribute such as
    ``.data``); and the storages of those arguments among ``storages`` (a view of a buffer is another tensor)."""

    def __init__(self, tensors: Collection[int], storages: Collection[int]):
        super().__init__()
        self.tensors = tensors
        self.storages = storages
        self.read: set[int] = set()
        self.read_storages: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        for t in pytree.tree_leaves((args, kwargs)):
            if id(t) in self.tensors:
                self.read.add(id(t))
            if isinstance(t, torch.Tensor) and (ptr := _storage(t)) in self.storages:
                self.read_storages.add(ptr)
        return func(*args, **kwargs)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, a subclass)
        return 0


def _refuse_state_kept_by_hand(reading: _Reading, forward: Callable[[], object]) -> None:
    names = reading.state_kept(forward)
    if names:
        raise Refusal(f"its forward keeps state in attributes ({', '.join(names)}), which passes recomputing "
                      "fewer modules than a plain forward would not advance alike")


def probe(model: nn.Module, graph: ModelGraph, example: Any) -> None:
    """One forward of the graph on the first batch, with grad, reading what its ops do not say; it leaves no
    trace (``_Reading``), and refuses a forward that keeps state in plain attributes, or a traced one changing in
    place what no name shows (``_InPlaceChanges``).

    - Each op's parameters and buffers gain those of the model it reads without owning them (a module keeping
      a reference to another's weight or running statistic outside the module tree): the value it makes depends
      on their stages too, so a pass after one of them moved recomputes it, and it is recomputed with every op
      touching such a buffer.
    - A traced graph's ``saved``: the ops whose value a forward with grad saves for its backward (by storage),
      or that view the batch; keeping one for a later pass holds no memory a plain step does not. (A chain's
      children are called whole: what they save stays unknown, counted as saved, and no saved-tensor hooks run,
      which ``torch.func`` inside a child would refuse.)
    """
    parameters = {id(p): p for p in model.parameters()}
    slots = buffer_slots(model)
    firsts = [id(m._buffers[name]) for m, name in slots]
    buffers = {b: b for b in firsts}  # a buffer's tensor (one a forward rebinds it to, too) -> the first one's
    held: dict[int, set[int]] = {}  # a buffer's storage -> the buffers on it (one registered as a view of another)
    for (m, name), first in zip(slots, firsts, strict=True):
        if ptr := _storage(m._buffers[name]):
            held.setdefault(ptr, set()).add(first)
    saved: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.add(t.untyped_storage().data_ptr())
        return t.detach()  # the tensor itself would hold its own grad_fn: a cycle that keeps the whole forward

    traced = graph.kind == "graph"
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if traced else contextlib.nullcontext()
    env: Env = [None] * len(graph.ops)
    env[0] = pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, example)  # the batch stays as it is
    changes = _InPlaceChanges(graph, env) if traced else None
    with _Reading(model) as reading:
        try:
            with torch.enable_grad(), hooks:
                for i, op in enumerate(graph.ops[1:], start=1):
                    before = changes.before(i) if changes is not None else None
                    with _Reads(parameters.keys() | buffers.keys(), held.keys()) as reads:
                        env[i] = op.evaluate(env)
                    if changes is not None:
                        changes.after(i, before)
                    op.params += tuple(sorted(reads.read & parameters.keys() - set(op.params)))
                    touched = {buffers[b] for b in reads.read & buffers.keys()}
                    touched |= {b for ptr in reads.read_storages for b in held[ptr]}  # through a view of one
                    op.buffers += tuple(sorted(touched - set(op.buffers)))
                    for (m, name), first in zip(slots, firsts, strict=True):
                        now = m._buffers.get(name)  # rebound by the op (each pass: again), or deleted
                        if now is not None:
                            buffers.setdefault(id(now), first)
                            if ptr := _storage(now):
                                held.setdefault(ptr, set()).add(first)
                if changes is not None:
                    changes.finish()
        except Refusal:
            raise
        except Exception as e:
            if not traced:  # the user's forward failing on this batch, as a step would say
                raise
            # forward() ran on this batch (_check_same_forward): reading it fails (torch.func refuses the hooks)
            raise Refusal(f"reading which values its backward saves fails: {_first_line(e)}") from None
        with torch.enable_grad():
            _refuse_state_kept_by_hand(reading, lambda: _run_whole(graph, env[0]))
    if traced:
        saved |= _storages(env[0])
        graph.saved = frozenset(i for i, value in enumerate(env) if _storages(value) <= saved)


CONSTANT_CHANGED = ("changes in place a tensor the graph holds as a constant (made while tracing, or outside the "
                    "model), which every call would change again")


class _InPlaceChanges:
    """What each op of a traced graph changes in place, seen by version counters as the probe runs it: what
    ``_refuse_shared_inplace`` cannot know from names (a custom Function's ``mark_dirty``, ``out=``). Refuses a
    change to a value another op also reads (or to one it views: views share the counter), and one to a tensor
    the graph holds as a constant (made while tracing: every call would change the same tensor)."""

    def __init__(self, graph: ModelGraph, env: Env):
        self.ops = graph.ops
        self.env = env
        readers = _readers(graph.ops)
        # Values several ops read, until the last of them ran (a change after that, to a value kept for a later
        # pass, the engine's version check catches as the pass loads it).
        self.last_read = {u: max(r) for u, r in enumerate(readers) if len(r) > 1 and u > 0 and not graph.ops[u].free}
        # Every op's: one changed through a value that is it or views it (``.to()``, ``.view()``) counts too.
        self.constants = list({id(t): t for op in graph.ops for t in op.constants}.values())
        self.values = [t.detach().clone() for t in self.constants]  # kernels such as batch norm's bump no version

    def before(self, i: int) -> tuple[list[tuple[int, tuple[int, ...]]], tuple[int | None, ...]]:
        shared = [(u, _versions(self.env[u])) for u, last in self.last_read.items() if u < i <= last]
        return shared, tuple(_version(t) for t in self.constants)

    def after(self, i: int, before: tuple[list[tuple[int, tuple[int, ...]]], tuple[int | None, ...]]) -> None:
        shared, constants = before
        op = self.ops[i]
        if constants != tuple(_version(t) for t in self.constants):
            raise Refusal(f"{op.name} {CONSTANT_CHANGED}")
        for u, versions in shared:
            if _versions(self.env[u]) != versions:
                raise Refusal(f"{op.name} changes {self.ops[u].name} in place while other operations read it too, "
                              "which a graph of values cannot order")

    def finish(self) -> None:
        """After the forward: a constant whose values changed with no version counter seeing it."""
        if not all(same_values(t, value) for t, value in zip(self.constants, self.values, strict=True)):
            raise Refusal(f"its forward {CONSTANT_CHANGED}")


def _storages(value: Any) -> set[int]:
    if isinstance(value, torch.Tensor):  # the common case, without walking a tree
        return {value.untyped_storage().data_ptr()}
    return {t.untyped_storage().data_ptr() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)}


def settings_of(module: nn.Module, *, chain: bool) -> tuple:
    """What of a module's attributes a traced graph may have fixed (the branches and loops they chose, the
    functions it called, the numbers it read, the in-place changes it checked) and the reading found no state
    kept with: numbers, strings and flags (numpy's and enums too), functions and classes, and containers and
    plain objects (a config namespace, a dataclass, slotted too) of these, three levels down and up to 64 items
    across (a larger one by identity). On a ``chain``, none for torch.nn's own modules (not a subclass): called
    whole, they keep no state outside their buffers and read their own parameters alone, whatever their rate.
    Not seen: a number read from a tensor (``.item()``), class attributes, closures. Tensors are no settings: a
    traced graph reads them from the module."""
    if chain and type(module).__module__.startswith(_TORCH_NN):
        return ()
    return tuple((k, setting) for k, v in vars(module).items()
                 if not k.startswith("_") and (setting := _setting(v, 3)) is not _NOT_A_SETTING)


def _setting(value: Any, depth: int) -> Any:
    if isinstance(value, _PLAIN):
        return _NAN if isinstance(value, float) and math.isnan(value) else value  # NaN != NaN: a new key each step
    if isinstance(value, (*_HASHED, *_FUNCTIONS)) or type(value).__module__ in ("fractions", "decimal"):
        return value  # equal by value, or by identity (held by the key: its identity is not reused)
    if isinstance(value, (torch.Tensor, nn.Module)) or depth == 0:
        return _NOT_A_SETTING
    if type(value).__module__ == "numpy" and hasattr(value, "tobytes"):  # a numpy scalar or array
        return (type(value), value.shape, str(value.dtype), value.tobytes()) if value.size <= 64 else _Same(value)
    if isinstance(value, slice):  # not hashable before Python 3.12
        return slice, tuple(_setting(v, 0) for v in (value.start, value.stop, value.step))
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple, collections.deque, set, frozenset)):
        items = list(enumerate(value))
    elif not isinstance(value, type) and (hasattr(value, "__dict__") or hasattr(type(value), "__slots__")):
        items = _attributes(value)  # a namespace, a dataclass
    else:
        return _NOT_A_SETTING
    if len(items) > 64:
        return _Same(value)
    if isinstance(value, (set, frozenset)):
        return type(value), frozenset(_setting(v, depth - 1) for _, v in items)
    return type(value), tuple((k, _setting(v, depth - 1)) for k, v in items)


def _attributes(value: Any) -> list[tuple[str, Any]]:
    """A plain object's public attributes, in its ``__dict__`` and its slots."""
    found = [(k, v) for k, v in getattr(value, "__dict__", {}).items() if not k.startswith("_")]
    for cls in type(value).__mro__:
        slots = getattr(cls, "__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if not name.startswith("_") and hasattr(value, name):
                found.append((name, getattr(value, name)))
    return found


class _Same:
    """A key part equal only to one for the same object (held: its identity is not reused)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


_TORCH_NN = ("torch.nn.", "torch.ao.nn.")
_PLAIN = (bool, int, float, str, type(None))
_HASHED = (complex, bytes, range, enum.Enum, type, torch.dtype, torch.device, torch.layout, torch.memory_format)
_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)
_NAN = object()
_NOT_A_SETTING = object()


def _run_whole(graph: ModelGraph, inputs: Any) -> Any:
    env: Env = [None] * len(graph.ops)
    env[0] = inputs
    for i, op in enumerate(graph.ops[1:], start=1):
        env[i] = op.evaluate(env)
    return env[-1]


# ---- the passes ----

@dataclass
class _PassPlan:
    steps: list[tuple[int, Callable[[Env], Any], bool, str | None, tuple[int, ...]]]  # op, evaluate, keep, rng
    # (save or restore the random numbers before it), frees
    loads: tuple[int, ...]    # values read from earlier passes
    drops: tuple[int, ...]    # ... for the last time


class GraphEngine:
    """Recompute what depends on a moved stage, reuse the rest, for one model graph, stages and update order.

    ``recomputed[j]`` is the set of op indices pass j evaluates (the first pass: all).
    """

    def __init__(self, graph: ModelGraph, stages: Sequence[Stage], order: Sequence[int]):
        self.graph = graph
        self.stages = list(stages)
        self.order = list(order)
        self.recomputed = recompute_sets(graph, self.stages, self.order)
        self.volatile = set(graph.volatile)
        self._plans = plan_passes(graph, self.recomputed)
        self._whole = _whole_pass(graph)
        self._cache: dict[int, tuple[Any, tuple[int, ...]]] = {}
        self._rng: dict[int, RngState] = {}
        self._batch: set[int] = set()  # storage of the step's inputs

    @property
    def kind(self) -> str:
        return self.graph.kind

    def stale(self) -> bool:
        """An in-place modification was found since this plan was made."""
        return self.volatile != self.graph.volatile

    def kept_tensors(self) -> list[torch.Tensor]:
        """The values held between passes (for memory accounting; views of the batch are the caller's)."""
        return [t for value, _ in self._cache.values() for t in pytree.tree_leaves(value)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self._batch]

    def make_pass(self, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], torch.Tensor]) -> RunPass:
        """The pass function for one step on this batch (nothing is kept from the step before)."""
        self._cache.clear()
        self._rng.clear()
        self._batch = _storages(inputs)
        whole = False

        def run(j: int, gradients: StageGradients) -> torch.Tensor:
            nonlocal whole
            plan = self._whole if whole else self._plans[j]
            if j > 0 and not whole and not self._intact(plan.loads):
                whole, plan = True, self._whole
                self._cache.clear()
            with gradients.intercepting_backward():  # a backward inside the forward (a hook's) is the pass's
                env: Env = [None] * len(self.graph.ops)
                env[0] = inputs
                for u in plan.loads:  # a value modified in place: a copy, where a later pass reads the kept one
                    env[u] = _feed(self._cache[u][0], copy=u in self.volatile and u not in plan.drops)
                for u in plan.drops:
                    del self._cache[u]
                for i, evaluate, keep, rng, frees in plan.steps:
                    if rng is _RESTORE:
                        rng_restore(self._rng[i])
                    elif rng is _SAVE:
                        self._rng[i] = rng_snapshot()
                    value = env[i] = evaluate(env)
                    if keep:
                        self._cache[i] = _keep(value, copy=i in self.volatile)
                    if frees:
                        for u in frees:
                            env[u] = None
                out = env[-1]
                del env
                loss = loss_fn(out, targets)
                del out
            gradients.backward_loss(loss)
            return loss

        return run

    def _intact(self, loads: Sequence[int]) -> bool:
        """Whether every value this pass reads is as kept; marks those modified in place as volatile."""
        changed = {u for u in loads if _versions(self._cache[u][0]) != self._cache[u][1]}
        if changed:
            self.graph.volatile |= changed
        return not changed


def stage_uses(graph: ModelGraph, stages: Sequence[Stage]) -> list[frozenset[int]]:
    """Per op, the stages whose parameters it uses itself."""
    stage_of = {id(p): k for k, s in enumerate(stages) for p in s.params}
    return [frozenset(stage_of[p] for p in op.params if p in stage_of) for op in graph.ops]


def dependencies(graph: ModelGraph, stages: Sequence[Stage]) -> list[frozenset[int]]:
    """Per op, the stages its value depends on: those it uses, those the values it reads depend on, and, for an
    op touching a buffer, those of the ops that touched it before (a running statistic read after the call that
    updates it depends on what that call read)."""
    depends: list[frozenset[int]] = []
    touched: dict[int, frozenset[int]] = {}  # buffer -> what the ops touching it so far depend on
    for op, uses in zip(graph.ops, stage_uses(graph, stages), strict=True):
        found = uses.union(*(depends[r] for r in op.reads))
        if not op.free:
            found = found.union(*(touched.get(b, frozenset()) for b in op.buffers))
            for b in op.buffers:
                touched[b] = found
        depends.append(found)
    return depends


def recompute_sets(graph: ModelGraph, stages: Sequence[Stage], order: Sequence[int]) -> list[frozenset[int]]:
    """Per pass, the ops it evaluates: all in the first; later, those depending on the stage that moved last or
    on the stage it updates, with every op touching a buffer they touch, and the ops making any value they read
    that autograd does not save anyway (kept from an earlier pass, it would hold memory a plain step does not:
    recomputed instead, from values that are saved)."""
    ops = graph.ops
    depends = dependencies(graph, stages)
    touching: dict[int, set[int]] = {}
    for i, op in enumerate(ops):
        if not op.free:
            for b in op.buffers:
                touching.setdefault(b, set()).add(i)
    every = frozenset(range(len(ops)))
    sets = [every]
    for j in range(1, len(order)):
        hit = {order[j - 1], order[j]}
        todo = [i for i, d in enumerate(depends) if d & hit and not ops[i].free]
        chosen: set[int] = set()
        while todo:
            i = todo.pop()
            if i in chosen:
                continue
            chosen.add(i)
            todo += [t for b in ops[i].buffers for t in touching.get(b, ())]
            if graph.saved is not None:
                todo += [r for r in ops[i].reads if r not in graph.saved and not ops[r].free]
        last = len(ops) - 1
        sets.append(frozenset(chosen) if last in chosen else every)  # else: no op carries stage k's gradient
    return sets


def plan_passes(graph: ModelGraph, recomputed: Sequence[frozenset[int]]) -> list[_PassPlan]:
    """Per pass: which values it loads, keeps for later passes and drops, where it saves the random numbers for a
    later pass and where it restores them, and after which op each value it holds is no longer needed."""
    ops = graph.ops
    n = len(recomputed)
    readers = _readers(ops)
    # For each (non-free) value and pass: "compute", "read" (from the cache) or None.
    events = [[("compute" if i in recomputed[j] else
                "read" if any(v in recomputed[j] for v in readers[i]) else None) for j in range(n)]
              for i in range(len(ops))]

    def next_event(i: int, j: int) -> str | None:
        return next((e for e in events[i][j + 1:] if e is not None), None)

    timed = [i for i, op in enumerate(ops) if not op.free]
    starts: list[set[int]] = [set() for _ in range(n)]  # ops opening a run of recomputed ops (not the pass start)
    for j in range(1, n):
        for before, i in zip(timed, timed[1:], strict=False):
            if i in recomputed[j] and before not in recomputed[j]:
                starts[j].add(i)
    # A run starts where the pass that evaluated its op last stood: the ops before it drew, in this pass, as many
    # random numbers as they drew when they last ran (a count can depend on the data: RReLU's).
    saves: list[set[int]] = [set() for _ in range(n)]
    last: dict[int, int] = {}
    for j in range(n):
        for i in starts[j]:
            saves[last[i]].add(i)
        last.update(dict.fromkeys(recomputed[j], j))
    plans = []
    for j in range(n):
        run = [i for i in range(1, len(ops)) if i in recomputed[j] or (ops[i].free and any(
            v in recomputed[j] for v in readers[i]))]
        loads = tuple(i for i in range(1, len(ops)) if not ops[i].free and events[i][j] == "read")
        drops = tuple(i for i in loads if next_event(i, j) != "read")
        keep = {i for i in run if not ops[i].free and next_event(i, j) == "read"}
        frees = _last_uses(ops, run)
        rng = dict.fromkeys(saves[j], _SAVE) | dict.fromkeys(starts[j], _RESTORE)  # restored: as saved already
        plans.append(_PassPlan([(i, ops[i].evaluate, i in keep, rng.get(i), frees.get(i, ())) for i in run],
                               loads, drops))
    return plans


_SAVE, _RESTORE = "save", "restore"  # the random numbers before an op: kept for a later pass, or put back


def _readers(ops: Sequence[Op]) -> list[list[int]]:
    """Per op, the ops that read its value (each once: an op's reads name a value once)."""
    readers: list[list[int]] = [[] for _ in ops]
    for i, op in enumerate(ops):
        for r in op.reads:
            readers[r].append(i)
    return readers


def _whole_pass(graph: ModelGraph) -> _PassPlan:
    run = list(range(1, len(graph.ops)))
    frees = _last_uses(graph.ops, run)
    return _PassPlan([(i, graph.ops[i].evaluate, False, None, frees.get(i, ())) for i in run], (), ())


def _last_uses(ops: Sequence[Op], run: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """op -> the values held in this pass to let go once it ran (a value no op reads: right after it is made).
    The output stays; the input belongs to the caller."""
    last = {u: u for u in run}
    for i in run:
        for r in ops[i].reads:
            last[r] = i
    frees: dict[int, list[int]] = {}
    for value, at in last.items():
        if value not in (0, len(ops) - 1):
            frees.setdefault(at, []).append(value)
    return {at: tuple(values) for at, values in frees.items()}


# ---- kept values ----

def _keep(value: Any, *, copy: bool) -> tuple[Any, tuple[int, ...]]:
    """Detached (copied, for a value a module modifies in place), with its ``requires_grad`` flag (modules
    choose kernels by it), and its version counters."""
    kept = _map_tensors(functools.partial(_detach, copy=copy), value)
    return kept, _versions(kept)


def _detach(t: torch.Tensor, copy: bool) -> torch.Tensor:
    kept = t.detach().clone() if copy else t.detach()
    return kept.requires_grad_() if t.requires_grad else kept


def _versions(value: Any) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return (value._version,)
    return tuple(t._version for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


def _feed(kept: Any, *, copy: bool) -> Any:
    if copy:
        kept = _map_tensors(functools.partial(_detach, copy=True), kept)
    return _map_tensors(_non_leaf, kept)


def _non_leaf(t: torch.Tensor) -> torch.Tensor:
    return _Alias.apply(t) if t.requires_grad else t


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    return fn(value) if isinstance(value, torch.Tensor) else pytree.tree_map_only(torch.Tensor, fn, value)


class _Alias(torch.autograd.Function):
    """The kept tensor again, as a non-leaf: a module may then modify it in place, as in the full forward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


# ---- small helpers ----

def _ids(tensors: Any) -> tuple[int, ...]:
    return tuple(id(t) for t in tensors)


def _never(env: Env) -> Any:
    raise AssertionError("the input is set by the pass")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _ambient() -> tuple:
    """Autograd state a traced graph cannot record."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    try:
        autocast = (torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))
    except TypeError:  # torch < 2.4
        autocast = (torch.is_autocast_cpu_enabled(), torch.is_autocast_enabled())
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast,
            None if hooks is None else tuple(id(h) for h in hooks))


def global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)
