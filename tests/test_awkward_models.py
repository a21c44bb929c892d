"""Both entry points against the reference on the models researchers train, over several steps, in float64."""

import copy
import warnings

import pytest
import torch
from awkward import BASES, CASES, UNTRACEABLE, Case
from conftest import Traced

from backforward import Backforward, reference_step
from backforward.graph import plain_sequential


def backward(loss):
    loss.backward()
    return loss


def twins(case: Case):
    """The case's model and a deep copy, with the copy's parameters found by position."""
    ref = copy.deepcopy(case.model)
    index = {id(p): i for i, p in enumerate(case.model.parameters())}
    ref_params = list(ref.parameters())

    def mirror(params):
        return [ref_params[index[id(p)]] for p in params]

    return ref, mirror


def run(case: Case, entry: str, base: str, order: str = "forward"):
    """Step the engine and the reference side by side; compare everything a step leaves behind.

    ``entry`` "traced" is ``step_batch`` on a model torch.fx must trace (a chain is wrapped).
    """
    model, (ref, mirror) = case.model, twins(case)
    spec = case.spec(model) if case.spec else None
    stepped = Traced(model) if entry == "traced" and plain_sequential(model) else model
    engine = Backforward(stepped, BASES[base](model), stages=spec, order=order)
    ref_opt = BASES[base](ref)
    devices = {"cpu", next(model.parameters()).device.type}  # each generator a step may draw from
    for t, (x, y) in enumerate(case.batches):
        stages = [mirror(s) for s in case.stages(model, t)]
        torch.manual_seed(t)
        ref_losses = reference_step(ref, ref_opt, stages[::-1] if order == "reverse" else stages,
                                    lambda x=x, y=y: backward(case.loss_fn(ref(x), y)))
        ref_next = [torch.rand(4, device=d) for d in sorted(devices)]
        torch.manual_seed(t)
        if entry == "step":
            engine.step(lambda x=x, y=y: backward(case.loss_fn(model(x), y)))
        else:
            engine.step_batch(x, y, case.loss_fn)
        for d, expected in zip(sorted(devices), ref_next, strict=True):
            assert torch.equal(torch.rand(4, device=d), expected), f"step {t}: {d} random numbers advanced differently"
        assert engine.last_losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12), f"step {t}"
        # On CUDA, from the second step on, running statistics are computed from parameters that may differ from
        # the reference's in the last bits (seen on an H100: a ResNet's BatchNorm, step 2).
        on_cpu = devices == {"cpu"}
        assert_same_state(model, ref, engine, ref_opt, t, exact=on_cpu, exact_buffers=on_cpu or t == 0)
    return engine


def close(a, b, exact=True):
    """Equal bit for bit (NaN where NaN); ``exact=False``: in the last bits (CUDA kernels, seen on an H100)."""
    rtol, atol = (0.0, 0.0) if exact else (1e-10, 1e-12)
    return a is None and b is None or (a is not None and b is not None
                                       and torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))


def assert_same_state(model, ref, engine, ref_opt, t, exact=True, exact_buffers=True):
    """``exact=False``: parameters, gradients and optimizer state in the last bits; ``exact_buffers=False``:
    running statistics within that tolerance (they are computed from such parameters)."""
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert close(p, q, exact), f"step {t}: parameter {name}"
        assert close(p.grad, q.grad, exact), f"step {t}: gradient of {name}"
        assert p.requires_grad == q.requires_grad, name
        state, ref_state = engine.state.get(p, {}), ref_opt.state.get(q, {})
        assert state.keys() == ref_state.keys(), f"step {t}: optimizer state of {name}"
        for key, value in ref_state.items():
            assert close(torch.as_tensor(state[key]), torch.as_tensor(value), exact), f"step {t}: {key} of {name}"
    for (name, b), c in zip(model.named_buffers(), ref.buffers(), strict=True):
        assert torch.equal(b, c) or not exact_buffers and close(b, c, exact=False), f"step {t}: buffer {name}"
    for group, ref_group in zip(engine.param_groups, ref_opt.param_groups, strict=True):
        assert {k: v for k, v in group.items() if k != "params"} == \
               {k: v for k, v in ref_group.items() if k != "params"}


@pytest.mark.parametrize("entry", ["step", "step_batch"])
@pytest.mark.parametrize("name", list(CASES))
def test_awkward_model_equals_reference(name, entry):
    run(CASES[name](), entry, "momentum")


def on_cuda(value):
    if isinstance(value, torch.Tensor):
        return value.cuda()
    if isinstance(value, (tuple, list)):
        return type(value)(on_cuda(v) for v in value)
    return value


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("entry", ["step", "step_batch"])
@pytest.mark.parametrize("name", list(CASES))
def test_awkward_model_on_cuda_equals_reference(name, entry):
    case = CASES[name]()
    case.model.cuda()
    case.batches = on_cuda(case.batches)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        run(case, entry, "momentum")


@pytest.mark.parametrize("name", list(CASES))
def test_every_case_that_traces_runs_on_the_graph_engine_and_equals_reference(name):
    """Each case (a chain wrapped in a module with its own forward) through torch.fx; those fx cannot trace
    exactly run the generic engine, with one warning of one line saying why."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = run(CASES[name](), "traced", "momentum")
    said = [str(w.message) for w in caught if "backforward" in str(w.message)]
    if name in UNTRACEABLE:
        assert engine._engine == "generic"
        assert len(said) == 1 and "\n" not in said[0] and "generic engine" in said[0], said
        assert UNTRACEABLE[name] in said[0] or "trace" in said[0], said
    else:
        assert engine._engine == "graph" and not said, said


@pytest.mark.parametrize("name", ["resnet", "digit_transformer", "residual", "tied", "dropout", "causal_attention"])
def test_graph_engine_equals_reference_in_reverse_order(name):
    run(CASES[name](), "traced", "adam", order="reverse")


@pytest.mark.parametrize("base", ["adam", "adamw2"])
@pytest.mark.parametrize("name", ["frozen", "tied", "transformer_train", "batchnorm", "branch", "resnet"])
def test_awkward_model_equals_reference_with_adaptive_bases(name, base):
    run(CASES[name](), "step_batch", base)


@pytest.mark.parametrize("name", ["residual", "tied", "transformer_train", "dropout", "buffer_reader"])
def test_awkward_model_equals_reference_in_reverse_order(name):
    run(CASES[name](), "step", "momentum", order="reverse")


def test_default_stages_follow_data_flow():
    names = {
        "logit_scale": ["l1", "l2", "(root)"],
        "attention": ["attention", "attention.out_proj", "head"],
        "tied": ["emb", "mid", "head"],
        "frozen": ["0", "4"],
        "transformer_train": [f"encoder.layers.0.{n}" for n in
                              ("self_attn", "self_attn.out_proj", "norm1", "linear1", "linear2", "norm2")] + ["head"],
    }
    for name, expected in names.items():
        engine = run(CASES[name](), "step", "momentum")
        assert engine.stage_names == expected, name


def test_frozen_parameters_never_move_and_get_no_gradient():
    case = CASES["frozen"]()
    frozen = case.model[2]
    stale = torch.ones_like(frozen.weight)
    frozen.weight.grad = stale  # even a stale gradient on a frozen layer must not move it
    before = [p.detach().clone() for p in frozen.parameters()]
    engine = Backforward(case.model, torch.optim.SGD(case.model.parameters(), lr=0.1, weight_decay=0.1))
    for x, y in case.batches:
        engine.step_batch(x, y, case.loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.parameters(), strict=True))
    assert frozen.weight.grad is stale and frozen.bias.grad is None
    assert all(not p.requires_grad for p in frozen.parameters())
    assert engine.stage_names == ["0", "4"]


def test_unfreezing_after_wrapping_adds_a_stage():
    case = CASES["frozen"]()
    engine = Backforward(case.model, torch.optim.SGD(case.model.parameters(), lr=0.1))
    x, y = case.batches[0]
    engine.step_batch(x, y, case.loss_fn)
    assert engine.stage_names == ["0", "4"]
    case.model[2].requires_grad_(True)  # gradual unfreezing
    before = case.model[2].weight.detach().clone()
    engine.step_batch(x, y, case.loss_fn)
    assert engine.stage_names == ["0", "2", "4"]
    assert not torch.equal(before, case.model[2].weight)


def test_unused_stage_gets_no_gradient_and_no_update():
    case = CASES["unused"]()
    aux = case.model.aux
    before = [p.detach().clone() for p in aux.parameters()]
    engine = Backforward(case.model, torch.optim.AdamW(case.model.parameters(), lr=0.1, weight_decay=0.5))
    for x, y in case.batches:
        engine.step(lambda x=x, y=y: backward(case.loss_fn(case.model(x), y)))
    assert all(torch.equal(a, b) and p.grad is None for a, b, p in zip(before, aux.parameters(), aux.parameters(),
                                                                         strict=True))


def test_transformer_eval_with_padding_runs_the_plain_forward_in_every_pass():
    """PyTorch's inference fast path (nested tensors) must not be taken in any pass: it is not what a plain
    training forward computes (padded positions come out as zeros), and it has no backward."""
    case = CASES["transformer_eval_masked"]()
    model = case.model
    seen = []
    for layer in model.encoder.layers:
        layer.register_forward_hook(lambda m, a, out: seen.append(out.is_nested or bool((out == 0).all(-1).any())))
    engine = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = case.batches[0]
    engine.step(lambda: backward(case.loss_fn(model(x), y)))
    assert len(seen) == 2 * len(engine.stages) and not any(seen)


@pytest.mark.parametrize("entry", ["step", "step_batch"])
def test_granularity_child_and_depth_equal_reference(entry):
    case = CASES["transformer_train"]()
    model = case.model
    layer = model.encoder.layers[0]
    for spec, expected in (("child", [[*model.encoder.parameters()], [*model.head.parameters()]]),
                           ("depth:3", [[*layer.parameters()], [*model.head.parameters()]])):
        case = CASES["transformer_train"]()
        model = case.model
        layer = model.encoder.layers[0]
        by_hand = {"child": lambda m, t: [[*m.encoder.parameters()], [*m.head.parameters()]],
                   "depth:3": lambda m, t: [[*m.encoder.layers[0].parameters()], [*m.head.parameters()]]}[spec]
        case.spec, case.stages = (lambda m, s=spec: s), by_hand
        engine = run(case, entry, "adam")
        assert len(engine.stages) == len(expected) == 2
        assert engine.stage_names == (["encoder", "head"] if spec == "child" else ["encoder.layers.0", "head"])
