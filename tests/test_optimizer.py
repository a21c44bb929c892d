"""Backforward against the plain reference, against arithmetic, and against bad input."""

import copy
import math

import pytest
import torch
from conftest import BASES, assert_same_params, clone, make
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from backforward import Backforward, reference_step

F = nn.functional


def run_reference(model, stages, base, x, y, steps, reverse=False):
    opt = BASES[base](model.parameters())
    order = stages[::-1] if reverse else stages
    losses = []
    for _ in range(steps):
        torch.manual_seed(len(losses))
        losses.append(reference_step(model, opt, order, lambda: _backward(F.cross_entropy(model(x), y))))
    return opt, losses


def run_backforward(model, base, x, y, steps, entry, **kwargs):
    bf = Backforward(model, BASES[base](model.parameters()), **kwargs)
    losses = []
    for _ in range(steps):
        torch.manual_seed(len(losses))
        if entry == "step":
            bf.step(lambda: _backward(F.cross_entropy(model(x), y)))
        else:
            bf.step_batch(x, y, F.cross_entropy)
        losses.append(bf.last_losses)
    return bf, losses


def _backward(loss):
    loss.backward()
    return loss


MODELS = ["mlp3", "batchnorm", "dropout", "cnn", "reordered", "residual"]


@pytest.mark.parametrize("entry", ["step", "step_batch"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", MODELS)
def test_engines_equal_reference(name, base, entry):
    model, stages, x, y = make(name)
    ref_model, ref_stages = clone(model, stages)
    ref_opt, ref_losses = run_reference(ref_model, ref_stages, base, x, y, steps=4)
    bf, losses = run_backforward(model, base, x, y, steps=4, entry=entry)
    assert_same_params(model, ref_model)
    assert sum(losses, []) == pytest.approx(sum(ref_losses, []), rel=1e-5)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):  # base optimizer state too
        for key, value in ref_opt.state[q].items():
            torch.testing.assert_close(bf.state[p][key], value, atol=0, rtol=0)


@pytest.mark.parametrize("entry", ["step", "step_batch"])
@pytest.mark.parametrize("name", ["mlp3", "residual", "dropout"])
def test_reverse_order_equals_reference(name, entry):
    model, stages, x, y = make(name)
    ref_model, ref_stages = clone(model, stages)
    run_reference(ref_model, ref_stages, "momentum", x, y, steps=3, reverse=True)
    run_backforward(model, "momentum", x, y, steps=3, entry=entry, order="reverse")
    assert_same_params(model, ref_model)


@pytest.mark.parametrize("entry", ["step", "step_batch"])
def test_explicit_stages_equal_reference(entry):
    model, _, x, y = make("mlp3")
    # Two stages: the first two Linears together, then the head.
    stages = [[*model[0].parameters(), *model[2].parameters()], list(model[4].parameters())]
    ref_model, ref_stages = clone(model, stages)
    run_reference(ref_model, ref_stages, "adam", x, y, steps=3)
    bf, _ = run_backforward(model, "adam", x, y, steps=3, entry=entry, stages=stages)
    assert len(bf.stages) == 2
    assert_same_params(model, ref_model)


def test_explicit_module_stages_keep_the_given_order():
    model, _, x, y = make("mlp3")
    ref_model, ref_stages = clone(model, [list(model[4].parameters()), list(model[0].parameters()),
                                          list(model[2].parameters())])
    run_reference(ref_model, ref_stages, "sgd", x, y, steps=2)
    bf, _ = run_backforward(model, "sgd", x, y, steps=2, entry="step", stages=[model[4], model[0], model[2]])
    assert bf.stage_names == ["4", "0", "2"]
    assert_same_params(model, ref_model)


def test_default_stages_follow_call_order_not_registration():
    model, _, x, y = make("reordered")
    assert [n for n, _ in model.named_children()] == ["head", "mid", "stem"]
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    bf.step_batch(x, y, F.cross_entropy)
    assert bf.stage_names == ["stem", "mid", "head"]


@st.composite
def random_chains(draw):
    """A random nn.Sequential: widths, activations, dropout, children reused as they are or inside a block."""
    width = draw(st.integers(1, 5))
    children, linears = [nn.Linear(draw(st.integers(1, 5)), width)], []
    linears.append(children[0])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["new", "new", "reuse", "reuse_inside"]))
        act = draw(st.sampled_from([nn.Tanh, nn.ReLU, lambda: nn.Dropout(0.3)]))()
        if kind == "new" or len(linears) == 1:
            layer = nn.Linear(width, width)
            linears.append(layer)
            children += [act, layer]
        elif kind == "reuse":
            children += [act, draw(st.sampled_from(linears[1:]))]
        else:
            children.append(nn.Sequential(act, draw(st.sampled_from(linears[1:]))))
    head = nn.Linear(width, 3)
    linears.append(head)
    children += [nn.Tanh(), head]
    model = nn.Sequential(*children).double()
    forward = list({id(m): m for c in model for m in c.modules() if isinstance(m, nn.Linear)}.values())
    split = draw(st.one_of(st.none(), st.lists(st.integers(0, 2), min_size=len(forward), max_size=len(forward))))
    return model, forward, split


@settings(max_examples=30, deadline=None)
@given(chain=random_chains(), batch=st.integers(1, 5), seed=st.integers(0, 2**16),
       base=st.sampled_from(list(BASES)), order=st.sampled_from(["forward", "reverse"]))
def test_property_random_chains_step_batch_equals_step_equals_reference(chain, batch, seed, base, order):
    model, forward, split = chain
    torch.manual_seed(seed)
    x = torch.randn(batch, model[0].in_features, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,))
    if split is None:  # default stages: each Linear once, in the order the forward first uses it
        spec, by_hand = None, [list(m.parameters()) for m in forward]
    else:  # explicit stages: random groups of Linears, in label order
        groups = [[p for m, label in zip(forward, split, strict=True) if label == g for p in m.parameters()]
                  for g in sorted(set(split))]
        spec, by_hand = groups, groups
    step_model, ref = copy.deepcopy(model), copy.deepcopy(model)
    index = {id(p): i for i, p in enumerate(model.parameters())}

    def mirror(m, stages):
        params = list(m.parameters())
        return [[params[index[id(p)]] for p in s] for s in stages]

    fast = Backforward(model, BASES[base](model.parameters()), stages=spec, order=order)
    slow = Backforward(step_model, BASES[base](step_model.parameters()),
                       stages=mirror(step_model, spec) if spec else None, order=order)
    ref_opt = BASES[base](ref.parameters())
    ref_stages = mirror(ref, by_hand)
    for t in range(2):
        torch.manual_seed(t)
        reference_step(ref, ref_opt, ref_stages[::-1] if order == "reverse" else ref_stages,
                       lambda: _backward(F.cross_entropy(ref(x), y)))
        torch.manual_seed(t)
        slow.step(lambda: _backward(F.cross_entropy(step_model(x), y)))
        torch.manual_seed(t)
        fast.step_batch(x, y, F.cross_entropy)
    assert_same_params(step_model, ref)
    assert_same_params(model, ref)


def test_hand_computed_two_scalar_layers():
    """y_hat = w2·w1·x, L = ½(y_hat − y)², x=1, y=2, w1=w2=1, lr=0.1, worked out on paper.

    Pass 1: r = w2·w1·x − y = −1, dL/dw1 = r·w2·x = −1, so w1' = 1 + 0.1 = 1.1.
    Pass 2 (sees w1'): r' = 1.1 − 2 = −0.9, dL/dw2 = r'·w1'·x = −0.99, so w2' = 1 + 0.099 = 1.099.
    Plain SGD uses r = −1 for w2 too: dL/dw2 = −1, w2 = 1.1. Pass losses: ½ and ½·0.81 = 0.405.
    """
    def model_and_closure():
        m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
        with torch.no_grad():
            m[0].weight.fill_(1.0)
            m[1].weight.fill_(1.0)
        x, y = torch.ones(1, 1), torch.full((1, 1), 2.0)
        return m, x, y, lambda: _backward(0.5 * ((m(x) - y) ** 2).sum())

    for entry in ("reference", "step", "step_batch"):
        m, x, y, closure = model_and_closure()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        if entry == "reference":
            losses = reference_step(m, opt, [[m[0].weight], [m[1].weight]], closure)
        else:
            bf = Backforward(m, opt)
            if entry == "step":
                bf.step(closure)
            else:
                bf.step_batch(x, y, lambda out, target: 0.5 * ((out - target) ** 2).sum())
            losses = bf.last_losses
        assert m[0].weight.item() == pytest.approx(1.1, abs=1e-6), entry
        assert m[1].weight.item() == pytest.approx(1.099, abs=1e-6), entry
        assert losses == pytest.approx([0.5, 0.405], abs=1e-6), entry
    m, _, _, closure = model_and_closure()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    closure()
    opt.step()
    assert (m[0].weight.item(), m[1].weight.item()) == pytest.approx((1.1, 1.1), abs=1e-6)


@pytest.mark.parametrize("base", list(BASES))
def test_single_stage_equals_base_step_exactly(base):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain, _ = clone(model, [])
    plain_opt = BASES[base](plain.parameters())
    bf = Backforward(model, BASES[base](model.parameters()))
    for _ in range(3):
        plain_opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()
        bf.step_batch(x, y, F.cross_entropy)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)


def test_several_stages_differ_from_base_step_where_earlier_stages_moved():
    model, _, x, y = make("mlp3")
    plain, _ = clone(model, [])
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.3)
    F.cross_entropy(plain(x), y).backward()
    plain_opt.step()
    Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3)).step_batch(x, y, F.cross_entropy)
    # Stage 1 saw nothing move before it: same update as SGD, bit for bit.
    assert torch.equal(model[0].weight, plain[0].weight)
    # Later stages saw stage 1 move: different updates.
    assert not torch.allclose(model[2].weight, plain[2].weight, atol=1e-4)
    assert not torch.allclose(model[4].weight, plain[4].weight, atol=1e-4)


@pytest.mark.parametrize("entry", ["step", "step_batch"])
def test_dropout_rng_advances_as_after_one_forward_pass(entry):
    model, _, x, y = make("dropout")
    plain, _ = clone(model, [])
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    bf.step_batch(x, y, F.cross_entropy)  # first step finds the stage order
    torch.manual_seed(7)
    plain(x)
    expected = torch.rand(3)
    torch.manual_seed(7)
    if entry == "step":
        bf.step(lambda: _backward(F.cross_entropy(model(x), y)))
    else:
        bf.step_batch(x, y, F.cross_entropy)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("entry", ["step", "step_batch"])
def test_batchnorm_statistics_advance_once_from_the_first_pass(entry):
    model, _, x, y = make("batchnorm")
    plain, _ = clone(model, [])
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.5))
    for _ in range(2):
        plain(x)  # statistics of the network the step starts from
        with torch.no_grad():
            before = [p.clone() for p in model.parameters()]
        if entry == "step":
            bf.step(lambda: _backward(F.cross_entropy(model(x), y)))
        else:
            bf.step_batch(x, y, F.cross_entropy)
        assert_same_params(model, model)  # sanity: comparable
        for bn, bn_plain in ((model[1], plain[1]), (model[4], plain[4])):
            assert int(bn.num_batches_tracked) == int(bn_plain.num_batches_tracked)
            torch.testing.assert_close(bn.running_mean, bn_plain.running_mean, rtol=0, atol=0)
            torch.testing.assert_close(bn.running_var, bn_plain.running_var, rtol=0, atol=0)
        with torch.no_grad():  # keep the plain twin at the same parameters for the next step
            for p, q in zip(plain.parameters(), model.parameters(), strict=True):
                p.copy_(q)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert int(model[1].num_batches_tracked) == 2


def test_gradients_after_step_are_the_ones_applied_and_nothing_stale():
    model, _, x, y = make("mlp3")
    plain, _ = clone(model, [])
    F.cross_entropy(plain(x), y).backward()
    for p in model.parameters():  # garbage a careless loop would carry into the step
        p.grad = torch.full_like(p, 1e3)
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3))
    bf.step_batch(x, y, F.cross_entropy)
    # Stage 1's gradient is the plain one at θ_t; the base update used exactly that.
    torch.testing.assert_close(model[0].weight.grad, plain[0].weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(model[0].weight, plain[0].weight - 0.3 * plain[0].weight.grad)  # SGD rounds once
    # The last stage's gradient is the one at (θ'_1, θ'_2, θ_3), recomputed here by hand.
    check, _ = clone(model, [])
    with torch.no_grad():
        check[4].weight.copy_(plain[4].weight)
        check[4].bias.copy_(plain[4].bias)
    F.cross_entropy(check(x), y).backward()
    torch.testing.assert_close(model[4].weight.grad, check[4].weight.grad, rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())


def test_optimizer_protocol():
    model, _, x, y = make("mlp3")
    base = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    bf = Backforward(model, base)
    assert isinstance(bf, torch.optim.Optimizer)
    assert bf.param_groups is base.param_groups and bf.state is base.state
    calls = []
    bf.register_step_pre_hook(lambda *a: calls.append("pre"))
    bf.register_step_post_hook(lambda *a: calls.append("post"))
    scheduler = torch.optim.lr_scheduler.StepLR(bf, step_size=1, gamma=0.5)
    bf.step_batch(x, y, F.cross_entropy)
    bf.step(lambda: _backward(F.cross_entropy(model(x), y)))
    scheduler.step()
    assert calls == ["pre", "post", "pre", "post"]  # each entry point is one step to hooks
    assert base.param_groups[0]["lr"] == pytest.approx(0.15)
    saved = bf.state_dict()
    twin, _ = clone(model, [])
    twin_bf = Backforward(twin, torch.optim.SGD(twin.parameters(), lr=1.0, momentum=0.9))
    twin_bf.load_state_dict(saved)
    assert twin_bf.param_groups[0]["lr"] == pytest.approx(0.15)
    assert twin_bf.state is twin_bf.base_optimizer.state
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(twin_bf.state[q]["momentum_buffer"], bf.state[p]["momentum_buffer"], rtol=0, atol=0)
    bf.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ---- bad input: a clear error, never a silent wrong answer ----

def test_error_model_without_trainable_parameters():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="holds no trainable parameters"):
        Backforward(frozen, torch.optim.SGD(frozen.parameters(), lr=0.1))


def test_error_optimizer_parameters_outside_the_model():
    model, other = nn.Linear(2, 2), nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"not a parameter of the model"):
        Backforward(model, torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1))


def test_error_parameter_in_two_stages_or_in_none():
    model, _, _, _ = make("mlp3")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as caught:
        Backforward(model, opt, stages=[model[0], [model[0].weight], model[2], model[4]])
    assert str(caught.value) == "parameter 0.weight is claimed by two stages: '0' and '0.weight'"  # both named
    with pytest.raises(ValueError) as caught:
        Backforward(model, opt, stages=[[model[0].weight, model[0].weight, model[0].bias], model[2], model[4]])
    assert str(caught.value) == "parameter 0.weight is listed twice in stage '0.weight'"
    with pytest.raises(ValueError, match=r"parameter 4.bias is in no stage"):
        Backforward(model, opt, stages=[model[0], model[2], [model[4].weight]])
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="claimed by two stages"):
        Backforward(tied, torch.optim.SGD(tied.parameters(), lr=0.1), stages=[tied[0], tied[1]])
    # By default a tied parameter belongs to its first owner.
    assert [len(s.params) for s in Backforward(tied, torch.optim.SGD(tied.parameters(), lr=0.1)).stages] == [2, 1]


def test_error_unknown_order():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="order must be one of"):
        Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), order="backward")


def test_error_closure_returns_nothing_or_skips_backward():
    model, _, x, y = make("mlp3")
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="must return the loss"):
        bf.step(lambda: F.cross_entropy(model(x), y).backward())
    with pytest.raises(RuntimeError, match="did not call backward"):
        bf.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(TypeError, match="needs a closure"):
        bf.step()
    assert all(p.requires_grad for p in model.parameters())  # left as it was


def test_error_non_finite_loss_names_pass_and_stage():
    model, _, x, y = make("mlp3")
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    bf.step_batch(x, y, F.cross_entropy)
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y) * (math.inf if len(calls) == 2 else 1.0)
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match=r"non-finite loss inf in pass 2 \(stage 2, '2'\)"):
        bf.step(closure)


def test_parameters_the_optimizer_does_not_hold_get_no_gradient():
    model, _, x, y = make("mlp3")
    held = [*model[0].parameters(), *model[4].parameters()]  # model[2] trains only if the optimizer holds it
    before = [p.detach().clone() for p in model[2].parameters()]
    bf = Backforward(model, torch.optim.SGD(held, lr=0.3))
    bf.step_batch(x, y, F.cross_entropy)
    bf.step(lambda: _backward(F.cross_entropy(model(x), y)))
    assert bf.stage_names == ["0", "4"]
    assert all(p.grad is None and p.requires_grad for p in model[2].parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model[2].parameters(), strict=True))


@pytest.mark.parametrize("entry", ["step", "step_batch"])
def test_a_step_returns_the_loss_at_the_point_it_started_from(entry):
    model, _, x, y = make("dropout")
    twin, _ = clone(model, [])
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3))
    for t in range(2):
        torch.manual_seed(t)
        plain = F.cross_entropy(twin(x), y).detach()  # the same dropout masks as the step's first pass
        torch.manual_seed(t)
        loss = (bf.step(lambda: _backward(F.cross_entropy(model(x), y))) if entry == "step"
                else bf.step_batch(x, y, F.cross_entropy))
        assert float(loss) == pytest.approx(float(plain), rel=1e-6) == bf.last_losses[0]
        assert bf.last_losses[-1] != pytest.approx(float(plain), rel=1e-6)
        with torch.no_grad():
            for p, q in zip(twin.parameters(), model.parameters(), strict=True):
                p.copy_(q)


def test_a_layer_replaced_without_telling_the_optimizer_is_refused_before_anything_moves():
    model, _, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.step_batch(x, y, F.cross_entropy)
    model[4] = nn.Linear(5, 3)
    before = [p.detach().clone() for p in model.parameters()]
    for step in (lambda: opt.step_batch(x, y, F.cross_entropy),
                 lambda: opt.step(lambda: _backward(F.cross_entropy(model(x), y)))):
        with pytest.raises(ValueError, match=r"optimizer parameter #4 \(shape \(3, 5\)\) is not a parameter of the"):
            step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        assert all(p.grad is None for p in model[4].parameters())
