"""The corners DESIGN §1 defines: clipping, failed steps, hooks, group-level optimizer state, AMP, base checks."""

import contextlib
import copy
import math
import threading
import warnings
from unittest import mock

import pytest
import torch
from awkward import CASES
from conftest import assert_same_params, clone, make, penalised_mlp_beside_reference
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from backforward import Backforward, engines, reference_step, replay

F = nn.functional


def backward(loss):
    loss.backward()
    return loss


def linear_params(model):
    return [list(m.parameters(recurse=False)) for m in model.modules() if isinstance(m, nn.Linear)]


# ---- gradient clipping: one meaning in every pass ----

def clipped_closure(model, x, y, c):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c)  # the usual idiom: sees stage k's gradient alone
        return loss
    return closure


@pytest.mark.parametrize("track_ics", [False, True])
@pytest.mark.parametrize("explicit", [False, True])
def test_clipping_means_per_stage_norm_whatever_the_meter_stages_or_step(track_ics, explicit):
    model, _, x, y = make("mlp3")
    model.double()
    x = x.double()
    c = 0.05  # small enough that every stage is clipped
    ref, by_option = copy.deepcopy(model), copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    stages = linear_params(model) if explicit else None
    in_closure = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.5), stages=stages, track_ics=track_ics)
    option = Backforward(by_option, torch.optim.SGD(by_option.parameters(), lr=0.5), max_grad_norm=c)
    for _ in range(3):  # the first step is no different from later ones
        reference_step(ref, ref_opt, linear_params(ref), lambda: backward(F.cross_entropy(ref(x), y)),
                       max_grad_norm=c)
        in_closure.step(clipped_closure(model, x, y, c))
        option.step_batch(x, y, F.cross_entropy)
        for p in model.parameters():
            assert float(p.grad.norm()) <= c * (1 + 1e-6) or p.grad.dim() == 1
        assert_same_params(model, ref)
        assert_same_params(by_option, ref)


def test_clipping_by_hand_scales_each_stage_to_the_bound():
    # One Linear(1, 1, bias=False) stage after another; gradients worked out as in the two-scalar test:
    # pass 1: dL/dw1 = -1 -> clipped to norm 0.5 -> w1 = 1 + 0.1 * 0.5 = 1.05
    # pass 2: r' = 1.05 - 2 = -0.95, dL/dw2 = r' * w1' = -0.9975 -> clipped to -0.5 -> w2 = 1.05
    m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        for layer in m:
            layer.weight.fill_(1.0)
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64)
    opt = Backforward(m, torch.optim.SGD(m.parameters(), lr=0.1), max_grad_norm=0.5)
    opt.step_batch(x, y, lambda out, target: 0.5 * ((out - target) ** 2).sum())
    assert m[0].weight.item() == pytest.approx(1.05) and m[1].weight.item() == pytest.approx(1.05)


def test_the_ics_meter_never_changes_an_update():
    for name in ("transformer_train", "batchnorm", "tied"):
        case = CASES[name]()
        twin = copy.deepcopy(case.model)
        plain = Backforward(case.model, torch.optim.Adam(case.model.parameters(), lr=0.01))
        metered = Backforward(twin, torch.optim.Adam(twin.parameters(), lr=0.01), track_ics=True)
        for t, (x, y) in enumerate(case.batches):
            torch.manual_seed(t)
            plain.step_batch(x, y, case.loss_fn)
            torch.manual_seed(t)
            metered.step(lambda x=x, y=y, m=twin, f=case.loss_fn: backward(f(m(x), y)))
            assert metered.last_report is not None
        for p, q in zip(case.model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q), name


# ---- a step that fails leaves everything as it was ----

def snapshot(model, opt):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), torch.get_rng_state(),
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def assert_unchanged(before, model, opt):
    state, opt_state, rng, grads = before
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    after = opt.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    assert after["state"].keys() == opt_state["state"].keys()
    for i, entries in opt_state["state"].items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(after["state"][i][key]), torch.as_tensor(value)), (i, key)
    assert torch.equal(torch.get_rng_state(), rng)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert all(p.requires_grad for p in model.parameters())


def failing_closures(model, x, y):
    """Closures that fail in their second pass, each in its own way."""
    def nth(fail):
        calls = []

        def closure():
            calls.append(1)
            return fail(len(calls))
        return closure

    def loss():
        return F.cross_entropy(model(x), y)

    return {
        "raises": nth(lambda n: backward(loss()) if n < 2 else (_ for _ in ()).throw(RuntimeError("boom"))),
        "interrupt": nth(lambda n: backward(loss()) if n < 2 else (_ for _ in ()).throw(KeyboardInterrupt())),
        "stops calling backward": nth(lambda n: backward(loss()) if n < 2 else loss()),
        "non-finite loss": nth(lambda n: backward(loss() * (math.inf if n == 2 else 1.0))),
        "nan in the last pass": nth(lambda n: backward(loss() * (math.nan if n == 3 else 1.0))),
        "returns no tensor": nth(lambda n: backward(loss()) if n < 2 else backward(loss()).item()),
    }


@pytest.mark.parametrize("name", ["raises", "interrupt", "stops calling backward", "non-finite loss",
                                  "nan in the last pass", "returns no tensor"])
def test_failed_step_leaves_everything_as_it_was(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.ReLU(), nn.Linear(6, 5),
                          nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = Backforward(model, torch.optim.Adam(model.parameters(), lr=0.1))
    opt.step_batch(x, y, F.cross_entropy)  # state exists, stage order known
    before = snapshot(model, opt)
    with pytest.raises((RuntimeError, KeyboardInterrupt, FloatingPointError, TypeError)):
        opt.step(failing_closures(model, x, y)[name])
    assert_unchanged(before, model, opt)


def test_failed_steps_between_good_ones_each_leave_everything_as_it_was():
    # The rollback's copies are kept from step to step: a step that failed must not leave the optimizer
    # holding them as its state (the next step would overwrite them, and a later failure restore garbage).
    torch.manual_seed(0)
    model, _, x, y = make("dropout")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for _ in range(2):
        opt.step_batch(x, y, F.cross_entropy)
        before = snapshot(model, opt)
        with pytest.raises(FloatingPointError):
            opt.step(failing_closures(model, x, y)["non-finite loss"])
        assert_unchanged(before, model, opt)
    store = opt._plan.rollback_store
    kept = {key: t.data_ptr() for key, t in store.items()}
    opt.step_batch(x, y, F.cross_entropy)
    assert len(kept) == 2 * 6 and {key: t.data_ptr() for key, t in store.items()} == kept  # copied into, once
    assert all(opt.state[p]["momentum_buffer"].data_ptr() not in kept.values() for p in model.parameters())


def test_the_rollback_copies_a_parameter_whose_dtype_or_shape_changed_since_the_last_step_exactly():
    """The rollback's tensors are kept from step to step, one per parameter: a parameter converted to another
    dtype (``model.double()`` keeps the same Parameter objects) or resized gets a new one, not a lossy copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model.spare = nn.Parameter(torch.zeros(3))  # in no forward: resized below without breaking the model
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), stages=[model[0], model[2], [model.spare]])
    opt.step(lambda: backward(F.cross_entropy(model(x), y)))
    model.double()
    x = x.double()
    with torch.no_grad():
        model[0].weight.add_(1e-12)  # a change float32 would round away
        model.spare.data = torch.arange(5.0, dtype=torch.float64)
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError):
        opt.step(failing_closures(model, x, y)["non-finite loss"])  # inf in pass 2
    assert_unchanged(before, model, opt)


def test_the_rollback_copies_the_tensors_of_each_device_in_one_call_and_puts_them_back(monkeypatch):
    """One foreach copy per device (on a GPU one launch for all parameters and state, not one per tensor);
    Adam without capturable=True keeps its step count on the CPU beside parameters on the GPU (here: meta)."""
    calls = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_",
                        lambda slots, values: calls.append(sorted({t.device.type for t in slots + values}))
                        or real(slots, values))
    p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    state = {p: {"step": torch.tensor(1.0, device="meta"), "exp_avg": torch.randn(3)}, q: {"exp_avg": torch.randn(2)}}
    undo = replay.Rollback(state, {})
    undo.save([p, q])
    assert sorted(calls) == [["cpu"], ["meta"]]
    start = {p: p.detach().clone(), q: q.detach().clone()}
    with torch.no_grad():
        p.add_(1.0)
        q.mul_(3.0)
    undo.restore()
    assert torch.equal(p, start[p]) and torch.equal(q, start[q])


def test_a_failed_step_puts_back_a_parameter_the_closure_changed_before_its_stage_moved():
    """The rollback restores what the step began with: a closure that scales a later stage's weight in place in
    pass 1 (weight normalisation by hand) and then fails must not leave the scaled weight behind."""
    torch.manual_seed(0)
    model, _, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    opt.step_batch(x, y, F.cross_entropy)
    before = snapshot(model, opt)
    last = list(model.parameters())[-2]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 1:
            with torch.no_grad():
                last.mul_(0.5)
        return backward(F.cross_entropy(model(x), y) * (math.inf if len(calls) == 3 else 1.0))

    with pytest.raises(FloatingPointError, match="the step was undone"):
        opt.step(closure)
    assert len(calls) == 3
    assert_unchanged(before, model, opt)


def test_failed_first_step_removes_the_optimizer_state_it_created():
    model, _, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.Adam(model.parameters(), lr=0.1))
    before = snapshot(model, opt)
    undone = r"non-finite loss inf in pass 2 \(stage 2, '2'\); the step was undone"
    with pytest.raises(FloatingPointError, match=undone):
        opt.step(failing_closures(model, x, y)["non-finite loss"])
    assert_unchanged(before, model, opt)
    assert len(opt.state) == 0


def no_grad_closure(model, x, y):
    """A closure whose loss is computed under torch.no_grad(): its backward() has nothing to run."""
    def under_no_grad():
        with torch.no_grad():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return under_no_grad


def test_closure_without_backward_or_grad_raises_before_anything_moves():
    model, _, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = snapshot(model, opt)

    under_no_grad = no_grad_closure(model, x, y)

    with pytest.raises(RuntimeError, match="did not call backward"):
        opt.step(lambda: F.cross_entropy(model(x), y).detach())
    with pytest.raises(RuntimeError, match="does not require grad"):
        opt.step(under_no_grad)
    with pytest.raises(TypeError, match="must return the loss"):
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    assert_unchanged(before, model, opt)


def test_without_rollback_a_failed_step_says_earlier_stages_moved():
    model, _, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), rollback=False)
    first = model[0].weight.detach().clone()
    with pytest.raises(FloatingPointError, match=r"^non-finite loss inf in pass 2 \(stage 2, '2'\); the stages before "
                                                 r"it were already updated$"):
        opt.step(failing_closures(model, x, y)["non-finite loss"])
    assert not torch.equal(first, model[0].weight)


# ---- one step, one set of hooks ----

def test_both_entry_points_are_one_step_to_hooks_and_schedulers():
    model, _, x, y = make("mlp3")
    base = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9)
    opt = Backforward(model, base)
    calls, base_calls = [], []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    base.register_step_post_hook(lambda o, args, kwargs: base_calls.append([len(g["params"]) for g in o.param_groups]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "scheduler.step() before optimizer.step()" would be an error here
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        opt.step_batch(x, y, F.cross_entropy)
        scheduler.step()
        opt.step(lambda: backward(F.cross_entropy(model(x), y)))
        scheduler.step()
    assert calls == ["pre", "post", "pre", "post"]
    # The base optimizer steps once per pass, holding that stage's two parameters alone.
    assert base_calls == [[2], [2], [2]] * 2
    assert base.param_groups[0]["lr"] == pytest.approx(0.1)
    assert len(base.param_groups[0]["params"]) == 6


# ---- base optimizers with group-level state ----

class CountingSGD(torch.optim.Optimizer):
    """Keeps its step count in param_groups, as schedule-free optimizers do: lr_t = lr / step."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr, "step": 0})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] += 1
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=group["lr"] / group["step"])


class GroupNormSGD(CountingSGD):
    """Sets a group-level entry from the gradients it sees: cannot be split by stage."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["norm"] = float(sum(p.grad.norm() ** 2 for p in group["params"] if p.grad is not None))
        super().step()


def test_group_level_step_counter_advances_once_per_step():
    # Two scalar stages as in the hand-worked test, lr 0.2 / step. Step 1 uses lr 0.2 in both passes:
    # w1 = 1 + 0.2 = 1.2; r' = 1.2 - 2 = -0.8, dL/dw2 = -0.8 * 1.2 = -0.96, w2 = 1 + 0.192 = 1.192.
    m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        for layer in m:
            layer.weight.fill_(1.0)
    x, y = torch.ones(1, 1), torch.full((1, 1), 2.0)
    base = CountingSGD(m.parameters(), lr=0.2)
    opt = Backforward(m, base)
    opt.step_batch(x, y, lambda out, target: 0.5 * ((out - target) ** 2).sum())
    assert base.param_groups[0]["step"] == 1
    assert (m[0].weight.item(), m[1].weight.item()) == pytest.approx((1.2, 1.192))
    opt.step_batch(x, y, lambda out, target: 0.5 * ((out - target) ** 2).sum())
    assert base.param_groups[0]["step"] == 2
    ref = copy.deepcopy(m)
    ref_base = CountingSGD(ref.parameters(), lr=0.2)
    ref_base.param_groups[0]["step"] = 2
    with torch.no_grad():
        ref[0].weight.copy_(m[0].weight)
        ref[1].weight.copy_(m[1].weight)
    reference_step(ref, ref_base, [[ref[0].weight], [ref[1].weight]],
                   lambda: backward(0.5 * ((ref(x) - y) ** 2).sum()))
    opt.step_batch(x, y, lambda out, target: 0.5 * ((out - target) ** 2).sum())
    assert_same_params(m, ref)
    assert ref_base.param_groups[0]["step"] == base.param_groups[0]["step"] == 3


@pytest.mark.parametrize("where", ["optimizer", "global"])
def test_a_step_hook_counting_in_the_groups_of_a_torch_optimizer_counts_once_per_step(where):
    # torch.optim's own step keeps no group-level state; a step hook of its may, and is replayed as any.
    model, _, x, y = make("mlp3")
    base = torch.optim.SGD(model.parameters(), lr=0.1)

    def count(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            group["count"] = group.get("count", 0) + 1

    handle = (base.register_step_post_hook(count) if where == "optimizer"
              else register_optimizer_step_post_hook(count))
    try:
        opt = Backforward(model, base)
        opt.step_batch(x, y, F.cross_entropy)
        opt.step(lambda: backward(F.cross_entropy(model(x), y)))
    finally:
        handle.remove()
    # Once per step from the base's replayed steps; a global hook also runs after the wrapper's own step.
    assert base.param_groups[0]["count"] == (2 if where == "optimizer" else 4)


@pytest.mark.parametrize("entry", ["reference", "step_batch"])
def test_an_array_in_a_group_entry_is_compared_elementwise(entry):
    # == on a NumPy array gives an array: the entry is unchanged, not "set from the gradients".
    np = pytest.importorskip("numpy")
    m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        for layer in m:
            layer.weight.fill_(1.0)
    x, y = torch.ones(1, 1), torch.full((1, 1), 2.0)
    base = CountingSGD(m.parameters(), lr=0.2)
    base.param_groups[0]["tag"] = np.array([1.0, 2.0])
    if entry == "reference":
        reference_step(m, base, [[m[0].weight], [m[1].weight]], lambda: backward(0.5 * ((m(x) - y) ** 2).sum()))
    else:
        Backforward(m, base).step_batch(x, y, lambda out, target: 0.5 * ((out - target) ** 2).sum())
    assert (m[0].weight.item(), m[1].weight.item()) == pytest.approx((1.2, 1.192))  # the hand-worked step above
    assert base.param_groups[0]["step"] == 1 and base.param_groups[0]["tag"].tolist() == [1.0, 2.0]


class SGDWithAConstantTensor(CountingSGD):
    """CountingSGD with a group entry its step reads but never changes: a tensor (copied, so never identical)."""

    def __init__(self, params, lr):
        super().__init__(params, lr)
        for group in self.param_groups:
            group["mask"] = torch.ones(2)


def test_a_group_entry_the_base_step_leaves_equal_is_not_counted_as_its_state():
    model, _, x, y = make("mlp3")
    opt = Backforward(model, SGDWithAConstantTensor(model.parameters(), lr=0.1))
    opt.step_batch(x, y, F.cross_entropy)
    changed = []
    real = replay._changed_keys
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(replay, "_changed_keys", lambda before, group: changed.append(real(before, group)) or changed[-1])
        opt.step_batch(x, y, F.cross_entropy)
    assert changed == [["step"]]  # the counter, not the equal tensor


def sgd_under_a_scheduler(params, lr):
    """An LR scheduler wraps its optimizer's step on the instance (to check the call order); the wrapper
    only counts calls, so the step is still torch.optim's own."""
    opt = torch.optim.SGD(params, lr=lr)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert hasattr(vars(opt)["step"], "_wrapped_by_lr_sched")
    return opt


@pytest.mark.parametrize("base, snapshots", [(torch.optim.SGD, 1), (sgd_under_a_scheduler, 1), (CountingSGD, 2)])
def test_torch_optimizers_own_steps_are_not_watched_for_group_state(base, snapshots):
    # torch.optim's steps write per-parameter state alone: the group entries are copied once a step (for a
    # rollback), not again around the first base step.
    model, _, x, y = make("mlp3")
    opt = Backforward(model, base(model.parameters(), lr=0.1))
    opt.step_batch(x, y, F.cross_entropy)
    calls = []
    real = replay._group_entries
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(replay, "_group_entries", lambda group: calls.append(1) or real(group))
        opt.step_batch(x, y, F.cross_entropy)
    assert len(calls) == snapshots


class CountsItsCallsPerParameter(torch.optim.SGD):
    """Keeps a plain number in each parameter's state (not a tensor), as some optimizers do."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["calls"] = self.state[p].get("calls", 0.0) + 1.0
        return super().step(closure)


def test_a_failed_step_puts_back_plain_numbers_in_the_optimizer_state():
    model, _, x, y = make("mlp3")
    opt = Backforward(model, CountsItsCallsPerParameter(model.parameters(), lr=0.1))
    opt.step_batch(x, y, F.cross_entropy)
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError):
        opt.step(failing_closures(model, x, y)["nan in the last pass"])
    assert_unchanged(before, model, opt)
    assert [opt.state[p]["calls"] for p in model.parameters()] == [1.0] * 6


class TensorCountingSGD(torch.optim.Optimizer):
    """CountingSGD with its group-level state in mutable objects: the step count a tensor incremented in
    place, a list and a dict of tensors changed in place, a list appended to, an entry added by the first step
    and one it removes."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr, "step": torch.zeros(())})
        for group in self.param_groups:
            group["buffers"] = [torch.zeros(2)]
            group["stats"] = {"sum": torch.zeros(2)}
            group["seen"] = []
            group["fresh"] = True

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] += 1
            group["buffers"][0] += torch.tensor([1.0, 2.0])
            group["stats"]["sum"] += torch.tensor([3.0, 4.0])
            group["seen"].append(int(group["step"]))
            group["started"] = group.get("started", int(group["step"]))
            group.pop("fresh", None)
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=group["lr"] / float(group["step"]))


@pytest.mark.parametrize("engine", ["step", "step_batch"])
def test_group_state_in_mutable_objects_advances_once_per_step(engine):
    # The hand-worked numbers of the test above: lr 0.2 / step, two scalar stages.
    m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        for layer in m:
            layer.weight.fill_(1.0)
    x, y = torch.ones(1, 1), torch.full((1, 1), 2.0)
    ref = copy.deepcopy(m)
    ref_base = TensorCountingSGD(ref.parameters(), lr=0.2)
    base = TensorCountingSGD(m.parameters(), lr=0.2)
    opt = Backforward(m, base)

    def loss_fn(out, target):
        return 0.5 * ((out - target) ** 2).sum()

    for t in range(1, 4):
        reference_step(ref, ref_base, [[ref[0].weight], [ref[1].weight]], lambda: backward(loss_fn(ref(x), y)))
        if engine == "step":
            opt.step(lambda: backward(loss_fn(m(x), y)))
        else:
            opt.step_batch(x, y, loss_fn)
        if t == 1:
            assert (m[0].weight.item(), m[1].weight.item()) == pytest.approx((1.2, 1.192))
        for group in (base.param_groups[0], ref_base.param_groups[0]):
            assert torch.equal(group["step"], torch.tensor(float(t)))
            assert torch.equal(group["buffers"][0], torch.tensor([1.0, 2.0]) * t)
            assert torch.equal(group["stats"]["sum"], torch.tensor([3.0, 4.0]) * t)
            assert group["seen"] == list(range(1, t + 1))
            assert group["started"] == 1 and "fresh" not in group
        assert_same_params(m, ref)


def test_group_state_from_gradients_is_refused_and_the_step_undone():
    model, _, x, y = make("mlp3")
    opt = Backforward(model, GroupNormSGD(model.parameters(), lr=0.1))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"^the base optimizer GroupNormSGD sets param_groups\[0\]\['norm'\] from the "
                                         r"gradients it sees in a step; Backforward updates one stage per pass and "
                                         r"cannot split such an optimizer \(group-level state must not depend on the "
                                         r"gradients\)$"):
        opt.step_batch(x, y, F.cross_entropy)
    assert_unchanged(before, model, opt)


def test_parameter_group_added_after_wrapping_is_trained():
    model, _, x, y = make("mlp3")
    base = torch.optim.SGD([*model[0].parameters(), *model[2].parameters()], lr=0.3)
    opt = Backforward(model, base)
    opt.step_batch(x, y, F.cross_entropy)
    head = [p.detach().clone() for p in model[4].parameters()]
    base.add_param_group({"params": list(model[4].parameters()), "lr": 0.1})
    opt.step_batch(x, y, F.cross_entropy)
    assert opt.stage_names == ["0", "2", "4"]
    assert all(not torch.equal(a, b) for a, b in zip(head, model[4].parameters(), strict=True))
    opt.add_param_group({"params": []})  # through the wrapper too: the shared list
    assert len(base.param_groups) == 3


def test_a_parameter_outside_the_model_added_to_the_base_optimizer_is_refused_before_anything_moves():
    """A frozen one is never touched (as by a plain optimizer); one that requires grad could be in no stage."""
    model, _, x, y = make("mlp3")
    base = torch.optim.SGD(model.parameters(), lr=0.3)
    opt = Backforward(model, base)
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    base.add_param_group({"params": [frozen]})
    opt.step_batch(x, y, F.cross_entropy)
    assert torch.equal(frozen, torch.zeros(3)) and frozen.grad is None
    base.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"^optimizer parameter #7 \(shape \(2,\)\) is not a parameter of the "
                                         r"model$"):
        opt.step_batch(x, y, F.cross_entropy)
    assert_unchanged(before, model, opt)


def test_optimizers_that_need_a_closure_are_refused():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="LBFGS.step needs a closure"):
        Backforward(model, torch.optim.LBFGS(model.parameters()))
    lbfgs = torch.optim.LBFGS(model.parameters())
    torch.optim.lr_scheduler.StepLR(lbfgs, step_size=1)  # wraps the step on the instance
    with pytest.raises(TypeError, match="LBFGS.step needs a closure"):
        Backforward(model, lbfgs)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.step = lambda closure: torch.optim.SGD.step(sgd, closure)  # the step Backforward would call needs one
    with pytest.raises(TypeError, match="SGD.step needs a closure"):
        Backforward(model, sgd)


def test_an_optimizer_an_lr_scheduler_was_attached_to_first_is_accepted():
    """A scheduler made before the wrapper wraps the base step on the instance (its signature then reads as
    the unbound function's, self first): that is no closure the step needs."""
    model, _, x, y = make("mlp3")
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)
    opt = Backforward(model, base)
    opt.step_batch(x, y, F.cross_entropy)
    scheduler.step()
    assert base.param_groups[0]["lr"] == 0.05 and scheduler.last_epoch == 1


def test_model_on_the_meta_device_is_refused_in_one_line():
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="meta device") as info:
        Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert "\n" not in str(info.value)


def test_changing_the_order_between_steps_follows_it():
    case = CASES["dropout"]()
    model = case.model
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = case.batches[0]
    opt.step_batch(x, y, case.loss_fn)
    opt.order = "reverse"
    ref = copy.deepcopy(model)
    torch.manual_seed(5)
    reference_step(ref, torch.optim.SGD(ref.parameters(), lr=0.1), case.stages(ref, 0)[::-1],
                   lambda: backward(case.loss_fn(ref(x), y)))
    torch.manual_seed(5)
    opt.step_batch(x, y, case.loss_fn)
    assert_same_params(model, ref)
    opt.order = "sideways"
    with pytest.raises(ValueError, match="order must be one of"):
        opt.step_batch(x, y, case.loss_fn)


# ---- mixed precision ----

def overflowing_in_pass_2(model, x, y, scaler):
    """An AMP closure whose scaled loss is infinite in its second call (pass 2), finite otherwise."""
    calls = []

    def overflowing():
        calls.append(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss * (math.inf if len(calls) == 2 else 1.0)).backward()
        return loss
    return overflowing


def amp_closure(model, x, y, scaler=None):
    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss
    return closure


def test_bfloat16_autocast_equals_reference():
    model, _, x, y = make("batchnorm")
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9))
    for _ in range(3):
        reference_step(ref, ref_opt, [list(m.parameters()) for m in ref if list(m.parameters())],
                       amp_closure(ref, x, y))
        opt.step(amp_closure(model, x, y))
    assert_same_params(model, ref)


def test_grad_scaler_unscales_each_pass_and_skips_steps_with_inf():
    model, _, x, y = make("mlp3")
    unscaled = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3), grad_scaler=scaler)
    plain = Backforward(unscaled, torch.optim.SGD(unscaled.parameters(), lr=0.3))
    for _ in range(3):  # scaling by a power of two and back is exact
        opt.step(amp_closure(model, x, y, scaler))
        scaler.update()
        plain.step(amp_closure(unscaled, x, y))
        assert not opt.last_step_skipped
        assert_same_params(model, unscaled)
    assert scaler.get_scale() == 2.0 ** 11  # grew once after two clean steps
    before = snapshot(model, opt)[:2]
    overflowing = overflowing_in_pass_2(model, x, y, scaler)

    opt.step(overflowing)
    scaler.update()
    assert opt.last_step_skipped and scaler.get_scale() == 2.0 ** 10
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[0][key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float16_autocast_with_grad_scaler_equals_unscaled():
    model, _, x, y = make("dropout")
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3), grad_scaler=scaler)
    plain = Backforward(twin, torch.optim.SGD(twin.parameters(), lr=0.3))

    def closure(m, s=None):
        def run():
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(m(x), y)
            (s.scale(loss) if s is not None else loss).backward()
            return loss
        return run

    for t in range(3):
        torch.manual_seed(t)
        opt.step(closure(model, scaler))
        scaler.update()
        torch.manual_seed(t)
        plain.step(closure(twin))
    assert_same_params(model, twin, atol=1e-6, rtol=1e-5)  # float16 gradients scaled and not: not bit for bit


def test_default_stages_with_a_reentrant_checkpoint_are_refused_before_anything_moves():
    case = CASES["checkpoint_reentrant"]()
    model = case.model
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = snapshot(model, opt)
    x, y = case.batches[0]
    with pytest.raises(ValueError) as info:
        opt.step_batch(x, y, case.loss_fn)
    assert str(info.value) == ("a reentrant checkpoint (torch.utils.checkpoint with use_reentrant=True) hides its "
                               "parameters from the autograd graph, so their data-flow order cannot be read: pass "
                               "stages=[...] in forward order, or use use_reentrant=False")
    assert_unchanged(before, model, opt)


# ---- closures researchers write, and resuming ----

def small_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return m, torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))


def against_reference(model, closure_for, steps=2, lr=0.2, **kwargs):
    """``closure_for(m, opt)`` builds the closure for model m; engine and reference must agree."""
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.5)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5), **kwargs)
    stages = [list(m.parameters(recurse=False)) for m in ref.modules() if list(m.parameters(recurse=False))]
    for _ in range(steps):
        reference_step(ref, ref_opt, stages, closure_for(ref, ref_opt))
        opt.step(closure_for(model, opt))
    assert_same_params(model, ref)
    return opt


def test_clip_grad_value_in_the_closure_with_an_unused_stage():
    case = CASES["unused"]()

    def closure_for(m, opt):
        def closure():
            opt.zero_grad()
            x, y = case.batches[0]
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_value_(m.parameters(), 0.05)  # fails on a list of no gradients
            return loss
        return closure

    against_reference(case.model, closure_for)


def test_input_gradients_through_backward_for_adversarial_examples():
    model, x, y = small_mlp()

    def closure_for(m, opt):
        def closure():
            xi = x.clone().requires_grad_(True)
            F.cross_entropy(m(xi), y).backward()
            adversarial = (x + 0.1 * xi.grad.sign()).detach()
            opt.zero_grad()
            loss = F.cross_entropy(m(adversarial), y)
            loss.backward()
            return loss
        return closure

    against_reference(model, closure_for)


def test_a_closure_may_name_its_own_backward_inputs_or_set_gradients_by_hand():
    for mode in ("inputs", "by hand"):
        model, x, y = small_mlp()

        def closure_for(m, opt, mode=mode, x=x, y=y):
            def closure():
                loss = F.cross_entropy(m(x), y)
                if mode == "inputs":
                    loss.backward(inputs=list(m.parameters()))
                else:
                    for p, g in zip(m.parameters(), torch.autograd.grad(loss, list(m.parameters())), strict=True):
                        p.grad = g
                return loss
            return closure

        against_reference(model, closure_for)


def test_a_closure_that_sets_the_learning_rate():
    model, x, y = small_mlp()

    def closure_for(m, opt):
        def closure():
            for group in opt.param_groups:
                group["lr"] = 0.05  # a manual warm-up
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss
        return closure

    opt = against_reference(model, closure_for)
    assert opt.param_groups[0]["lr"] == 0.05


def test_a_step_inside_no_grad_still_trains():
    model, x, y = small_mlp()

    def closure_for(m, opt):
        def closure():
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss
        return closure

    ref = copy.deepcopy(model)
    reference_step(ref, torch.optim.SGD(ref.parameters(), lr=0.2), [list(ref[i].parameters()) for i in (0, 2, 4)],
                   closure_for(ref, None))
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.2))
    with torch.no_grad():
        opt.step(closure_for(model, opt))
    assert_same_params(model, ref)


@pytest.mark.parametrize("when", ["in the closure", "before the step"])
@pytest.mark.parametrize("which", ["wrapper", "base"])
def test_unscaling_this_optimizer_is_refused_with_what_to_do_instead(when, which):
    """torch's AMP recipe for clipping (unscale_, clip, step) would unscale twice, and Backforward's passes
    recompute the gradients the user clipped: refused, whether in the closure or before the step."""
    model, _, x, y = make("mlp3")
    scaler = torch.amp.GradScaler("cpu")
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = Backforward(model, base, grad_scaler=scaler)

    def backward_unscaled_and_clipped():
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt if which == "wrapper" else base)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return loss

    if when == "before the step":
        backward_unscaled_and_clipped()
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"^with grad_scaler=, Backforward unscales each pass's gradients itself: "
                                           r"do not call scaler.unscale_\(\) or scaler.step\(\) on it, in the "
                                           r"closure or before the step; clip with max_grad_norm=$"):
        opt.step(backward_unscaled_and_clipped if when == "in the closure" else amp_closure(model, x, y, scaler))
    assert_unchanged(before, model, opt)


def test_one_scaler_for_two_optimizers_as_in_a_gan():
    """torch's AMP recipe for several optimizers: scaler.step(other) before Backforward's step, one
    scaler.update() after both. The other optimizer's entry is the user's, not an unscale in the closure;
    the Backforward step equals one without the other optimizer (scaling by a power of two is exact)."""
    model, _, x, y = make("mlp3")
    alone = copy.deepcopy(model)
    other = nn.Linear(3, 1)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    scaler, scaler_alone = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2))
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3), grad_scaler=scaler)
    opt_alone = Backforward(alone, torch.optim.SGD(alone.parameters(), lr=0.3), grad_scaler=scaler_alone)
    for _ in range(2):
        other_opt.zero_grad()
        scaler.scale(other(torch.randn(4, 3)).pow(2).mean()).backward()
        scaler.step(other_opt)
        opt.step(amp_closure(model, x, y, scaler))
        scaler.update()
        opt_alone.step(amp_closure(alone, x, y, scaler_alone))
        scaler_alone.update()
        assert not opt.last_step_skipped
        assert_same_params(model, alone)


def test_resuming_through_the_base_optimizer_keeps_scheduler_and_state_shared():
    model, x, y = small_mlp()
    base = torch.optim.Adam(model.parameters(), lr=0.1)
    opt = Backforward(model, base)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.1)
    opt.step_batch(x, y, F.cross_entropy)
    base.load_state_dict(base.state_dict())  # resuming a checkpoint replaces the base's groups and state
    opt.step_batch(x, y, F.cross_entropy)
    scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.01)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    assert len(opt.state_dict()["state"]) == len(list(model.parameters()))


def test_a_model_that_modifies_its_input_in_place_sees_the_same_batch_in_every_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                          nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    stages = [list(ref[i].parameters()) for i in (1, 3, 5)]
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.5))
    engines = []
    for t in range(4):
        torch.manual_seed(t)
        reference_step(ref, ref_opt, stages, lambda: backward(F.cross_entropy(ref(x.clone()), y)))
        torch.manual_seed(t)
        once = F.dropout(x.clone(), 0.2, training=True)  # what one plain forward leaves in the batch
        batch = x.clone()
        torch.manual_seed(t)
        opt.step_batch(batch, y, F.cross_entropy)
        engines.append(opt._engine)
        assert_same_params(model, ref)
        assert torch.equal(batch, once)  # whichever passes ran the dropout (the chain's later passes do not)
    assert engines == ["generic", "chain", "chain", "chain"]


def test_explicit_stages_are_checked_alike_and_read_once():
    model, x, y = small_mlp()
    other = nn.Linear(3, 3)
    opt_head_unheld = torch.optim.SGD([*model[0].parameters(), *model[2].parameters()], lr=0.1)
    with pytest.raises(ValueError, match="that the optimizer does not hold"):
        Backforward(model, opt_head_unheld, stages=[model[0], model[2], model[4]])
    with pytest.raises(ValueError, match="not the model's"):
        Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), stages=[model[0], model[2], model[4], other])
    # Generators of parameters are read once: unfreezing later finds the stages again.
    model[2].requires_grad_(False)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      stages=[model[0].parameters(), model[2].parameters(), model[4].parameters()])
    opt.step_batch(x, y, F.cross_entropy)
    model[2].requires_grad_(True)
    opt.step_batch(x, y, F.cross_entropy)
    assert opt.stage_names == ["0.weight", "2.weight", "4.weight"]
    blocks = nn.ModuleList([model[0], model[2]])
    named = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), stages=[blocks, model[4]])
    assert named.stage_names == ["0+2", "4"]  # an unregistered container: the modules it holds


class Nested(nn.Module):
    """enc.0.lin, enc.1.lin, a root parameter ``scale`` and a bias-free head: names of several depths."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(*(nn.Sequential() for _ in range(2)))
        for block in self.enc:
            block.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(()))
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.head(self.enc(x)) * self.scale


def test_stages_given_as_modules_are_named_by_registration_else_by_their_parameters_names():
    model = Nested()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def names(*stages):
        return Backforward(model, opt, stages=list(stages)).stage_names

    # Registered modules go by their names, the model itself by "(root)".
    assert names(model.enc, [model.scale], model.head) == ["enc", "scale", "head"]
    assert names(model) == ["(root)"]
    # Modules the model does not register (containers built on the fly): the common prefix of their
    # parameters' module names, else the modules owning them, "+"-joined ("(root)" for the model's own).
    lin0, lin1 = nn.Sequential(model.enc[0].lin), nn.ModuleList([model.enc[1].lin])
    assert names(lin0, lin1, [model.scale], nn.Sequential(model.head)) == ["enc.0.lin", "enc.1.lin", "scale", "head"]
    both = nn.ModuleList([model.enc[0].lin, model.enc[1].lin])
    assert names(both, [model.scale], model.head) == ["enc", "scale", "head"]
    across = nn.ModuleList([model.enc[0].lin, model.head])  # names of different depths, nothing in common
    root = nn.Module()
    root.scale = model.scale
    root.lin = model.enc[1].lin
    assert names(across, root) == ["enc.0.lin+head", "(root)+enc.1.lin"]


def test_stage_list_errors_name_the_stage():
    model, _, _, _ = make("mlp3")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"^stage 1 is a single tensor; pass a list of parameters or a module$"):
        Backforward(model, opt, stages=[model[0], model[2].weight, model[4]])
    with pytest.raises(TypeError, match=r"^stage 2 holds a float, not a parameter$"):
        Backforward(model, opt, stages=[model[0], model[2], [0.5]])


def test_errors_say_which_pass_and_which_stage_in_forward_numbering():
    model, _, x, y = make("mlp3")  # stages "0", "2", "4"

    def failing_in(bad_pass, make_bad=lambda loss: loss * math.inf):
        calls = []

        def closure():
            calls.append(1)
            loss = F.cross_entropy(model(x), y)
            return backward(make_bad(loss) if len(calls) == bad_pass else loss)
        return closure

    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    # The first pass of the first step, before the stage order is read: the pass alone.
    with pytest.raises(TypeError, match=r"it returned float in pass 1$"):
        opt.step(lambda: F.cross_entropy(model(x), y).item())
    with pytest.raises(RuntimeError, match=r"^the closure did not call backward\(\) in pass 1$"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    opt.step(failing_in(0))  # reads the order
    with pytest.raises(FloatingPointError, match=r"^non-finite loss inf in pass 1 \(stage 1, '0'\); the step was "):
        opt.step(failing_in(1))
    # Reverse order: pass 1 updates the last stage, pass 3 the first.
    opt.order = "reverse"
    with pytest.raises(FloatingPointError, match=r"^non-finite loss inf in pass 1 \(stage 3, '4'\); the step"):
        opt.step(failing_in(1))
    with pytest.raises(FloatingPointError, match=r"^non-finite loss nan in pass 3 \(stage 1, '0'\); the step"):
        opt.step(failing_in(3, lambda loss: loss * math.nan))


def test_a_step_failing_after_the_closure_added_a_parameter_group_still_puts_everything_back():
    torch.manual_seed(0)
    model, _, x, y = make("dropout")
    base = CountingSGD([*model[0].parameters(), *model[3].parameters()], lr=0.1)
    opt = Backforward(model, base)
    opt.step_batch(x, y, F.cross_entropy)
    params = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    def closure():
        loss = backward(F.cross_entropy(model(x), y))
        base.add_param_group({"params": list(model[6].parameters()), "step": 0})  # mid-step: refused below
        return loss

    with pytest.raises(ValueError, match=r"^the base optimizer has 2 parameter groups where the step began with 1: "
                                         r"add parameter groups between steps, not in the closure$"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert base.param_groups[0]["step"] == 1
    assert base.param_groups[1]["step"] == 0  # the added group: no base step ran over it


@pytest.mark.parametrize("base, changes", [(CountingSGD, True), (torch.optim.SGD, False)])
def test_whether_the_base_step_changes_group_state_is_found_by_a_step_run_and_undone(base, changes):
    # What a CUDA graph capture asks first (cuda_graphs.py): a replayed graph would not advance such state.
    model, _, x, y = make("mlp3")
    opt = Backforward(model, base(model.parameters(), lr=0.1))
    opt.step_batch(x, y, F.cross_entropy)
    before = snapshot(model, opt)
    losses = opt.last_losses
    assert opt._group_state_changes(x, y, F.cross_entropy) is changes
    assert_unchanged(before, model, opt)
    assert opt.last_losses == losses


class DoublesItsInputLater(nn.Module):
    """Modifies its input in place only once ``doubling`` is set (a flag a schedule might flip)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.doubling = False

    def forward(self, x):
        if self.doubling:
            x.mul_(2)
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.filterwarnings("ignore:backforward. step_batch runs the generic engine")  # traced again: x.mul_()
def test_a_model_that_starts_modifying_its_input_gets_the_step_undone_once_then_a_copy_each_step():
    """Steps that found the input untouched keep no copy of it; the first step that modifies it cannot put
    it back, so it is undone with one clear error; from then on every pass sees the batch as given."""
    torch.manual_seed(0)
    model = DoublesItsInputLater().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    stages = [list(ref.a.parameters()), list(ref.b.parameters())]
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.5))
    for _ in range(2):
        reference_step(ref, ref_opt, stages, lambda: backward(F.cross_entropy(ref(x.clone()), y)))
        opt.step_batch(x.clone(), y, F.cross_entropy)
    model.doubling = ref.doubling = True
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"^the model modified its input in place in this step, which it had not "
                                           r"done before; the step was undone: run it again \(the input is now "
                                           r"copied each step\)$"):
        opt.step_batch(x.clone(), y, F.cross_entropy)
    assert_unchanged(before, model, opt)
    for _ in range(2):
        reference_step(ref, ref_opt, stages, lambda: backward(F.cross_entropy(ref(x.clone()), y)))
        batch = x.clone()
        opt.step_batch(batch, y, F.cross_entropy)
        assert torch.equal(batch, 2 * x)  # one forward's worth, as after a plain step
        assert_same_params(model, ref)


# ---- found by mutation testing (scripts/mutation.sh): behaviour no test pinned down ----

def test_named_granularities_and_their_errors():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6)), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert Backforward(model, opt, stages="depth:1").stage_names == ["0", "1"]
    assert Backforward(model, opt, stages="child").stage_names == ["0", "1"]
    assert Backforward(model, opt, stages="depth:2").stage_names == ["0.0", "0.2", "1"]
    for bad in ("depth:0", "depth:x", "depth:", "layer"):
        with pytest.raises(ValueError, match=rf"^stages must be 'module', 'child', 'depth:N' \(N >= 1\) or a list, "
                                             rf"not '{bad}'$"):
            Backforward(model, opt, stages=bad)


def test_step_without_a_closure_says_what_to_pass():
    model, _, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"^Backforward.step needs a closure that computes the loss, calls backward\(\) "
                                        r"and returns the loss, as for torch.optim.LBFGS \(or use step_batch\); with a "
                                        r"GradScaler, pass grad_scaler= to Backforward and call step\(closure\), not "
                                        r"scaler.step\(optimizer\)$"):
        opt.step()


def test_the_engine_each_step_ran_and_the_fast_engine_built_once():
    model, stages, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), stages=stages)
    opt.step_batch(x, y, F.cross_entropy)
    assert opt._engine == "chain"  # listed stages: the order is known, the first step is fast already
    engines = list(opt._plan.engines.values())
    opt.step_batch(x, y, F.cross_entropy)
    assert list(opt._plan.engines.values()) == engines and len(engines) == 1  # the same plan, not built again
    opt.step(lambda: backward(F.cross_entropy(model(x), y)))
    assert opt._engine == "generic"


def test_parameters_the_optimizer_does_not_hold_keep_their_gradient_even_through_a_reentrant_checkpoint():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = checkpoint(lambda t: torch.tanh(self.b(torch.tanh(self.a(t)))), x, use_reentrant=True)
            return self.c(h)

    torch.manual_seed(0)
    model = Checkpointed()
    x, y = torch.randn(5, 4, requires_grad=True), torch.randint(0, 3, (5,))
    held = [*model.a.parameters(), *model.c.parameters()]
    ref = copy.deepcopy(model)
    ref_held = [*ref.a.parameters(), *ref.c.parameters()]
    for m in (model, ref):
        m.b.bias.grad = torch.full((6,), 7.0)  # the user's, from before: neither kept nor added to
    opt = Backforward(model, torch.optim.SGD(held, lr=0.1), stages=[list(model.a.parameters()),
                                                                    list(model.c.parameters())])
    ref_opt = torch.optim.SGD(ref_held, lr=0.1)
    for _ in range(2):
        opt.step(lambda: backward(F.cross_entropy(model(x), y)))
        reference_step(ref, ref_opt, [list(ref.a.parameters()), list(ref.c.parameters())],
                       lambda: backward(F.cross_entropy(ref(x), y)))
        assert_same_params(model, ref)
        for m in (model, ref):
            assert m.b.weight.grad is None and torch.equal(m.b.bias.grad, torch.full((6,), 7.0))


def test_a_disabled_grad_scaler_is_no_scaler():
    model, _, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      grad_scaler=torch.amp.GradScaler("cpu", enabled=False))
    with pytest.raises(FloatingPointError, match=r"^non-finite loss inf in pass 2"):
        opt.step(failing_closures(model, x, y)["non-finite loss"])


def test_an_overflow_in_the_last_pass_alone_skips_the_step():
    """Only the last stage's scaled gradient overflows and every pass loss is finite: the gradients tell."""
    model, _, x, y = make("mlp3")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3), grad_scaler=scaler)
    before = snapshot(model, opt)[0]
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss * (math.inf if len(calls) == 3 else 1.0)).backward()
        return loss

    opt.step(closure)
    assert all(math.isfinite(v) for v in opt.last_losses)
    assert opt.last_step_skipped
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_ics_meter_unscales_the_start_gradients():
    model, _, x, y = make("mlp3")
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaled = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3), grad_scaler=scaler, track_ics=True)
    plain = Backforward(twin, torch.optim.SGD(twin.parameters(), lr=0.3), track_ics=True)
    scaled.step(amp_closure(model, x, y, scaler))
    plain.step(amp_closure(twin, x, y))
    assert scaled.last_report == plain.last_report  # scaling by a power of two and back is exact


def test_with_clipping_the_ics_meter_compares_the_gradients_before_clipping():
    """G'_2 by hand: the first layer moved by lr times its clipped gradient; the meter reports G'_2 unclipped.
    A stage the forward does not use (``unused``) has no G' and counts zero."""
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = WithUnused()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    lr, clip = 0.5, 0.05
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    g1 = [p.grad.clone() for p in plain.body[0].parameters()]
    g2 = torch.cat([p.grad.reshape(-1) for p in plain.body[2].parameters()])
    scale = clip / float(torch.cat([g.reshape(-1) for g in g1]).norm())
    assert scale < 1  # the clip bites
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(moved.body[0].parameters(), g1, strict=True):
            p.sub_(lr * scale * g)
    F.cross_entropy(moved(x), y).backward()
    g2_after = torch.cat([p.grad.reshape(-1) for p in moved.body[2].parameters()])
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=lr), max_grad_norm=clip, track_ics=True)
    opt.step_batch(x, y, F.cross_entropy)
    report = opt.last_report
    assert report.stage_names == ["body.0", "body.2", "unused"]
    assert report.grad_shift[1] == pytest.approx(float((g2 - g2_after).norm()), rel=1e-4)
    assert report.grad_norm[1] == pytest.approx(float(g2.norm()), rel=1e-5)
    assert report.grad_shift[2] == 0.0 and report.grad_norm[2] == 0.0 and math.isnan(report.grad_cosine[2])
    assert all(p.grad is None for p in model.unused.parameters())


def test_without_the_finiteness_check_a_step_still_updates_and_a_non_finite_loss_passes():
    model, stages, x, y = make("mlp3")
    ref, ref_stages = clone(model, stages)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), check_finite=False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.step_batch(x, y, F.cross_entropy)
    reference_step(ref, ref_opt, ref_stages, lambda: backward(F.cross_entropy(ref(x), y)))
    assert_same_params(model, ref)
    opt.step(lambda: backward(F.cross_entropy(model(x), y) * math.inf))  # no error: the caller asked for none
    assert math.isinf(opt.last_losses[0])


def test_wrong_argument_types_are_refused_in_one_line():
    model, _, _, _ = make("mlp3")
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"^model must be an nn.Module, not str$"):
        Backforward("model", base)
    with pytest.raises(TypeError, match=r"^optimizer must be a torch.optim.Optimizer, not list$"):
        Backforward(model, list(model.parameters()))


def test_frozen_models_and_frozen_parameters_outside_the_model_at_construction():
    """A model with nothing to train is refused; a parameter outside the model is refused when the
    optimizer is wrapped, frozen or not (later, through the base optimizer, only one that requires grad)."""
    model, _, _, _ = make("mlp3")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^the optimizer holds no trainable parameters \(all are frozen\)$"):
        Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model.requires_grad_(True)
    foreign = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match=r"^optimizer parameter #6 \(shape \(2,\)\) is not a parameter of the model$"):
        Backforward(model, torch.optim.SGD([*model.parameters(), foreign], lr=0.1))


def test_freezing_one_layer_while_unfreezing_another_finds_the_stages_again():
    """The same number of trainable parameters, but other ones: the frozen layer must not move."""
    model, _, x, y = make("mlp3")
    model[0].requires_grad_(False)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3))
    opt.step_batch(x, y, F.cross_entropy)
    model[0].requires_grad_(True)
    model[4].requires_grad_(False)
    head, first = ([p.detach().clone() for p in model[i].parameters()] for i in (4, 0))
    opt.step_batch(x, y, F.cross_entropy)
    assert opt.stage_names == ["0", "2"]
    assert all(torch.equal(a, b) for a, b in zip(head, model[4].parameters(), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, model[0].parameters(), strict=True))


@pytest.mark.parametrize("first", [False, True])
def test_the_ics_meter_with_a_stage_the_first_pass_does_not_use(first):
    """The unused head's G is zero: norm 0, shift 0 and no angle (NaN), as plain arithmetic gives; also
    where it is the stage the first pass updates (listed first)."""
    case = CASES["unused"]()
    model = case.model
    x, y = case.batches[0]
    stages = [model.aux, model.l1, model.l2] if first else None
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), track_ics=True, stages=stages)
    opt.step_batch(x, y, F.cross_entropy)
    report = opt.last_report
    k = report.stage_names.index("aux")
    assert report.grad_norm[k] == 0.0 and report.grad_shift[k] == 0.0 and math.isnan(report.grad_cosine[k])


def test_construction_errors_are_one_line_each():
    model, _, _, _ = make("mlp3")
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        (lambda: Backforward(model, Backforward(model, base)), TypeError,
         "optimizer is already a Backforward; wrap the base optimizer once"),
        (lambda: Backforward(model, torch.optim.LBFGS(model.parameters())), TypeError,
         "LBFGS.step needs a closure and re-evaluates the loss itself; Backforward calls the base step once per "
         "stage without one"),
        (lambda: Backforward(model, base, max_grad_norm=0.0), ValueError, "max_grad_norm must be positive, got 0.0"),
        (lambda: Backforward(model, base, grad_scaler=object()), TypeError,
         "grad_scaler must be a torch.amp.GradScaler, not object"),
    ]
    for make_one, kind, message in cases:
        with pytest.raises(kind) as caught:
            make_one()
        assert str(caught.value) == message
    with torch.device("meta"):
        on_meta = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError) as caught:
        Backforward(on_meta, torch.optim.SGD(on_meta.parameters(), lr=0.1))
    assert str(caught.value) == ("the model's parameters are on the meta device (no data), e.g. 0.weight; "
                                 "materialise them first (model.to_empty(device=...) and initialise)")


def test_before_any_step_nothing_is_reported():
    model, _, _, _ = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert opt.last_losses == [] and opt.last_step_skipped is False and opt.last_report is None
    assert opt._engine == "generic"


def test_a_loss_that_is_not_a_scalar_is_refused_saying_where():
    model, _, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))

    def per_sample():
        loss = F.cross_entropy(model(x), y, reduction="none")
        loss.sum().backward()
        return loss

    with pytest.raises(ValueError) as caught:
        opt.step(per_sample)
    assert str(caught.value) == f"the loss must be a scalar; got shape ({len(y)},) in pass 1 (stage 1, '0')"


def test_finite_losses_whose_sum_overflows_are_finite():
    """The check adds the pass losses first: a sum that overflows is not a non-finite loss."""
    model, stages, x, y = make("mlp3")
    ref, ref_stages = clone(model, stages)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=1e-40))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-40)
    with torch.no_grad():
        huge = 3e38 / F.cross_entropy(model(x), y).item()  # each pass loss near 3e38 (float32's largest: 3.4e38)
    opt.step(lambda: backward(F.cross_entropy(model(x), y) * huge))
    ref_losses = reference_step(ref, ref_opt, ref_stages, lambda: backward(F.cross_entropy(ref(x), y) * huge))
    assert torch.isinf(torch.tensor(opt.last_losses).sum()) and opt.last_losses == ref_losses
    assert_same_params(model, ref)



# ---- found by the second mutation run: refusals in full, closures' backward() arguments, AMP ----

def test_a_detached_loss_after_gradients_set_by_hand_in_the_first_step_is_refused_in_full():
    """No backward() call, so the stage order must come from the returned loss: detached, it cannot."""
    model, _, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = snapshot(model, opt)

    def closure():
        loss = F.cross_entropy(model(x), y)
        for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters())), strict=True):
            p.grad = g
        return loss.detach()

    with pytest.raises(RuntimeError) as caught:
        opt.step(closure)
    assert str(caught.value) == ("the stage order is read from the loss's graph: return the loss undetached or "
                                 "pass stages=[...] in forward order")
    assert_unchanged(before, model, opt)


def test_a_loss_computed_under_no_grad_is_refused_in_full():
    model, _, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = snapshot(model, opt)

    under_no_grad = no_grad_closure(model, x, y)

    with pytest.raises(RuntimeError) as caught:
        opt.step(under_no_grad)
    assert str(caught.value) == ("the loss does not require grad in pass 1: it was computed under torch.no_grad(), "
                                 "detached, or from no trainable parameter")
    assert_unchanged(before, model, opt)


def test_without_rollback_an_amp_step_that_overflows_is_still_undone():
    """rollback=False drops the copies a failed step needs, not those an AMP skip needs: GradScaler.step
    skips a step whose gradients hold inf, and so must Backforward (stage 1 already moved in pass 1)."""
    model, _, x, y = make("mlp3")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9), grad_scaler=scaler,
                      rollback=False)
    opt.step(amp_closure(model, x, y, scaler))  # momentum buffers exist
    scaler.update()
    before = snapshot(model, opt)
    overflowing = overflowing_in_pass_2(model, x, y, scaler)

    opt.step(overflowing)
    assert opt.last_step_skipped
    state, opt_state, _, _ = before
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for i, entries in opt_state["state"].items():
        for key, value in entries.items():
            assert torch.equal(opt.state_dict()["state"][i][key], value), (i, key)


def test_hand_set_gradients_accumulated_in_the_closure_start_from_none_in_every_pass():
    """A closure that accumulates hand-set gradients (p.grad = p.grad + g) must find none left by another
    pass: every pass starts as the reference's does, with no gradient anywhere."""
    model, x, y = small_mlp()

    def closure_for(m, opt):
        def closure():
            loss = F.cross_entropy(m(x), y)
            for p, g in zip(m.parameters(), torch.autograd.grad(loss, list(m.parameters())), strict=True):
                p.grad = g if p.grad is None else p.grad + g
            return loss
        return closure

    against_reference(model, closure_for, steps=2)


def test_a_closure_passing_gradient_weights_to_backward():
    """loss_per_sample.backward(weights): the gradient argument reaches autograd (a weighted sum)."""
    model, x, y = small_mlp()
    weights = torch.linspace(0.5, 1.5, len(y), dtype=torch.float64)

    def closure_for(m, opt):
        def closure():
            per_sample = F.cross_entropy(m(x), y, reduction="none")
            per_sample.backward(weights)
            return (per_sample.detach() * weights).sum()
        return closure

    against_reference(model, closure_for)


def two_losses(m, x, y):
    """A classification loss and a penalty on the same output (multi-task): one graph, two roots."""
    out = m(x)
    return F.cross_entropy(out, y), out.pow(2).mean()


def test_a_closure_with_two_losses_sharing_a_graph_retains_it():
    """Multi-task: l1.backward(retain_graph=True) then l2.backward() through the same trunk."""
    model, x, y = small_mlp()

    def closure_for(m, opt):
        def closure():
            l1, l2 = two_losses(m, x, y)
            l1.backward(retain_graph=True)
            l2.backward()
            return l1 + l2
        return closure

    against_reference(model, closure_for)


def test_a_closure_calling_autograd_backward_on_a_list_of_losses():
    model, x, y = small_mlp()

    def closure_for(m, opt):
        def closure():
            l1, l2 = two_losses(m, x, y)
            torch.autograd.backward([l1, l2])
            return l1 + l2
        return closure

    against_reference(model, closure_for)


@pytest.mark.parametrize("batch", [False, True])
def test_steps_in_two_threads_each_route_their_own_backward_and_leave_torchs_in_place(batch):
    """In the second step, thread a's first pass begins, then thread b's; a finishes its whole step while b's first
    pass still runs, then b calls backward(). Each step matches the reference, and torch.autograd.backward is
    torch's afterwards, as the conftest fixture checks (a patch put back per pass would have left a's in place: b
    put back what it found on entering). The closure sees stage k's gradient alone. The first step reads the
    model's graph, whose probe forward calls the hook outside any pass."""
    model, x, y = small_mlp()
    models = {name: copy.deepcopy(model) for name in "ab"}
    seen = {"a": [], "b": []}  # gradients the closure sees after its backward: stage k's alone
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    first = {"a": False, "b": False}
    errors = []

    def meet(name):
        if not first[name]:
            return
        first[name] = False
        if name == "a":
            a_in.set()
            assert b_in.wait(10)
        else:
            assert a_in.wait(10)
            b_in.set()
            assert a_done.wait(10)

    def work(name):
        try:
            m = models[name]
            opt = Backforward(m, torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5))
            def closure():
                loss = F.cross_entropy(m(x), y)
                meet(name)
                loss.backward()
                seen[name].append(sum(p.grad is not None for p in m.parameters()))
                return loss

            if batch:
                m[0].register_forward_hook(lambda *_: meet(name))
            for second in (False, True):
                first[name] = second
                opt.step_batch(x, y, F.cross_entropy) if batch else opt.step(closure)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            errors.append(e)
        finally:
            if name == "a":
                a_done.set()

    threads = [threading.Thread(target=work, args=(name,)) for name in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert seen == ({"a": [], "b": []} if batch else {"a": [2] * 6, "b": [2] * 6})
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.5)
    for _ in range(2):
        reference_step(ref, ref_opt, [list(m.parameters(recurse=False)) for m in ref if list(m.parameters())],
                       lambda: backward(F.cross_entropy(ref(x), y)))
    for m in models.values():
        assert_same_params(m, ref)


def unheld_first_bias(model):
    """Backforward on ``model`` with an SGD that does not hold its first layer's bias, and the reference's steps."""
    held = [p for p in model.parameters() if p is not model[0].bias]
    return Backforward(model, torch.optim.SGD(held, lr=0.2))


def test_a_patch_that_puts_back_torchs_backward_inside_a_pass_leaves_later_passes_routed():
    """mock.patch begun before the step and stopped inside its first pass puts back torch's own backward over the
    router: from the next pass on the closure's backward is the pass's again (stage k's gradient alone, none for a
    parameter the optimizer does not hold), in this step and the next. (That first pass's backward is torch's own,
    unrestricted: it gives the unheld bias a gradient, taken away before the second step.)"""
    own = torch.autograd.backward
    model, x, y = small_mlp()
    ref = copy.deepcopy(model)
    opt = unheld_first_bias(model)
    patch = mock.patch("torch.autograd.backward", side_effect=own)  # a test counting backward calls, say
    patch.start()
    seen = []

    def closure():
        nonlocal patch
        if patch is not None:
            patch.stop()
            patch = None
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seen.append(sum(p.grad is not None for p in model.parameters()))
        return loss

    try:
        opt.step(closure)
        model[0].bias.grad = None
        opt.step(closure)
    finally:
        if patch is not None:
            patch.stop()
    assert torch.autograd.backward is own
    assert seen[1:] == [3, 3, 1, 2, 2]  # stage sizes, with the unheld bias's gradient in step 1
    assert model[0].bias.grad is None
    ref_opt = unheld_first_bias(ref).base_optimizer
    for _ in range(2):
        reference_step(ref, ref_opt, [[ref[0].weight], list(ref[2].parameters()), list(ref[4].parameters())],
                       lambda: backward(F.cross_entropy(ref(x), y)))
    assert_same_params(model, ref)


class RecordsBackward:
    """Stands for a pass's StageGradients: records the backward calls routed to it."""

    busy = False

    def __init__(self):
        self.calls = []

    def backward(self, tensors, *args):
        self.calls.append(tensors)


@pytest.mark.parametrize("before", ["torch's own", "a wrapper"])
def test_a_router_is_torchs_backward_while_a_pass_runs_and_then_puts_back_what_it_found(before, monkeypatch):
    """A router built afresh: while a pass runs (enter .. exit), torch.autograd.backward is the router, which
    sends this thread's calls to the pass and lets another thread's through; afterwards the name holds what it
    held before (torch's own, or a wrapper someone installed before the step)."""
    own = found = torch.autograd.backward
    if before == "a wrapper":
        def wrapper(*args, **kwargs):
            return own(*args, **kwargs)
        monkeypatch.setattr(torch.autograd, "backward", wrapper)
        found = wrapper
    router, pass_ = engines._BackwardRouter(), RecordsBackward()
    x = torch.ones(2, requires_grad=True)
    router.enter(pass_)
    assert torch.autograd.backward is router.backward
    (2 * x).sum().backward()
    assert len(pass_.calls) == 1 and x.grad is None
    elsewhere = threading.Thread(target=lambda: (3 * x).sum().backward())
    elsewhere.start()
    elsewhere.join()
    assert x.grad.tolist() == [3.0, 3.0] and len(pass_.calls) == 1
    router.exit()
    assert torch.autograd.backward is found


def test_a_wrapper_made_around_the_router_does_not_recurse(monkeypatch):
    """A library that took torch.autograd.backward during a step (the router) and wraps it afterwards: in the next
    step the router passes another thread's backward through that wrapper, which calls the router again; it then
    calls torch's own instead of recursing. The steps still equal the reference."""
    model, x, y = small_mlp()
    ref = copy.deepcopy(model)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.2))
    taken, outcome = [], []

    def closure():
        if not taken:
            taken.append(torch.autograd.backward)  # imported lazily, inside the first pass
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return taken[0](*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", wrapper)

    def elsewhere():
        try:
            other = nn.Linear(3, 1)
            other(torch.ones(2, 3)).sum().backward()
            outcome.append(other.weight.grad.tolist() == [[2.0, 2.0, 2.0]])
        except RecursionError as e:
            outcome.append(e)

    def second():
        if not outcome:
            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join()
        return closure()

    opt.step(second)
    assert outcome == [True] and calls
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    for _ in range(2):
        reference_step(ref, ref_opt, [list(m.parameters()) for m in ref if list(m.parameters())],
                       lambda: backward(F.cross_entropy(ref(x), y)))
    assert_same_params(model, ref)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_a_closure_using_the_graph_of_its_gradients():
    """backward(create_graph=True), then a curvature term from each gradient's own graph added to it."""
    model, x, y = small_mlp()

    def closure_for(m, opt):
        def closure():
            loss = F.cross_entropy(m(x), y)
            loss.backward(create_graph=True)
            for p in m.parameters():
                if p.grad is not None:
                    curvature, = torch.autograd.grad(p.grad.pow(2).sum(), p, retain_graph=True)
                    p.grad = (p.grad + 0.1 * curvature).detach()
            return loss
        return closure

    against_reference(model, closure_for)


def test_a_closure_naming_only_the_weights_as_backward_inputs_leaves_the_biases_alone():
    """backward(inputs=[weights]): the biases get no gradient, as in the reference, so they never move."""
    model, x, y = small_mlp()
    biases = [m.bias.detach().clone() for m in model if isinstance(m, nn.Linear)]

    def closure_for(m, opt):
        def closure():
            loss = F.cross_entropy(m(x), y)
            loss.backward(inputs=[layer.weight for layer in m if isinstance(layer, nn.Linear)])
            return loss
        return closure

    against_reference(model, closure_for)
    assert all(torch.equal(m.bias, b) for m, b in zip([m for m in model if isinstance(m, nn.Linear)], biases,
                                                       strict=True))


class FirstCallSGD(torch.optim.Optimizer):
    """Changes its group entries on its first call in ten ways that leave them equal or undetectable to a
    careless comparison, and takes a step of lr * (1 + the number of those first-call marks it still sees):
    a number turned into a tensor of the same value, a list into an equal tuple, list and dict elements
    consumed to None or filled from None, an entry added with the value None, one removed while None, a dict
    created where there was None, and keys added to an empty dict (``removes=False``: nine, none removed)."""

    def __init__(self, params, lr, removes=True):
        super().__init__(params, {"lr": lr})
        self.removes = removes
        for g in self.param_groups:
            g.update(scale=1.0, betas=[0.9, 0.99], pending=[0.5], filled=[None], pending_d={"f": 0.5},
                     filled_d={"f": None}, lazy=None, counts={})
            if removes:
                g["closing"] = None

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            marks = [not isinstance(g["scale"], torch.Tensor), isinstance(g["betas"], list),
                     g["pending"][0] is not None, g["filled"][0] is None, g["pending_d"]["f"] is not None,
                     g["filled_d"]["f"] is None, "opened" not in g, g["lazy"] is None, "n" not in g["counts"]]
            if self.removes:
                marks.append("closing" in g)
            g["scale"] = torch.tensor(float(g["scale"]))
            g["betas"] = tuple(g["betas"])
            g["pending"][0] = None
            g["filled"][0] = 1.0
            g["pending_d"]["f"] = None
            g["filled_d"]["f"] = 1.0
            g["opened"] = None
            g.pop("closing", None)
            g["lazy"] = g["lazy"] or {"n": 1}
            g["counts"].setdefault("n", 1)
            for p in g["params"]:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=g["lr"] * (1 + sum(marks)))


def two_scalar_layers_by_hand(w1, w2, lr):
    """One Backforward step on out = w2 * w1 * 1, loss (out - 2)^2 / 2, worked out by hand."""
    w1 = w1 - lr * (w1 * w2 - 2) * w2         # pass 1: dL/dw1 = r * w2
    w2 = w2 - lr * (w1 * w2 - 2) * w1         # pass 2, after w1 moved: dL/dw2 = r' * w1'
    return w1, w2


@pytest.mark.parametrize("entry", ["reference", "step", "step_batch"])
def test_every_pass_sees_group_entries_as_before_the_first_base_step_however_they_changed(entry):
    """The first step's passes all see every first-call mark (a step of 11 lr; 10 lr for the reference, which
    does not put back removed entries, see below), the second none."""
    m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        for layer in m:
            layer.weight.fill_(1.0)
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64)
    lr = 0.01
    base = FirstCallSGD(m.parameters(), lr=lr, removes=entry != "reference")
    marks = 10 if base.removes else 9
    opt = Backforward(m, base)

    def loss_fn(out, target):
        return 0.5 * ((out - target) ** 2).sum()

    w = (1.0, 1.0)
    for t in range(2):
        if entry == "reference":
            reference_step(m, base, [[m[0].weight], [m[1].weight]], lambda: backward(loss_fn(m(x), y)))
        elif entry == "step":
            opt.step(lambda: backward(loss_fn(m(x), y)))
        else:
            opt.step_batch(x, y, loss_fn)
        w = two_scalar_layers_by_hand(*w, lr * (1 + marks if t == 0 else 1))
        assert (m[0].weight.item(), m[1].weight.item()) == pytest.approx(w, rel=1e-12), t
        g = base.param_groups[0]
        assert torch.equal(g["scale"], torch.tensor(1.0)) and g["betas"] == (0.9, 0.99)
        assert g["pending"] == [None] and g["filled"] == [1.0] and g["pending_d"] == {"f": None}
        assert g["filled_d"] == {"f": 1.0} and "opened" in g and g["opened"] is None and "closing" not in g
        assert g["lazy"] == {"n": 1} and g["counts"] == {"n": 1}


def test_the_reference_puts_back_a_group_entry_the_first_base_step_removed():
    m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        for layer in m:
            layer.weight.fill_(1.0)
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64)
    base = FirstCallSGD(m.parameters(), lr=0.01)
    reference_step(m, base, [[m[0].weight], [m[1].weight]], lambda: backward(0.5 * ((m(x) - y) ** 2).sum()))
    assert (m[0].weight.item(), m[1].weight.item()) == pytest.approx(two_scalar_layers_by_hand(1.0, 1.0, 0.11))
    assert "closing" not in base.param_groups[0]  # and after the step, gone, as one base step leaves it


class PopsOnItsFirstCallOnly(torch.optim.SGD):
    """Removes a group entry in its first call ever (a one-off flag), not in later ones."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.calls = 0
        for group in self.param_groups:
            group["closing"] = None

    def step(self, closure=None):
        self.calls += 1
        if self.calls == 1:
            for group in self.param_groups:
                group.pop("closing")
        return super().step(closure)


def test_the_reference_leaves_group_entries_as_after_the_first_base_step():
    # Pass 2 sees the entry put back and its base step leaves it; the step ends as after pass 1: removed.
    m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    base = PopsOnItsFirstCallOnly(m.parameters(), lr=0.1)
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64)
    reference_step(m, base, [[m[0].weight], [m[1].weight]], lambda: backward(0.5 * ((m(x) - y) ** 2).sum()))
    assert base.calls == 2 and "closing" not in base.param_groups[0]


def scalar_chain_by_hand(ws, lr):
    """One Backforward step on out = w_n * ... * w_1 * 1, loss (out - 2)^2 / 2: dL/dw_k = r * out / w_k."""
    ws = list(ws)
    for k in range(len(ws)):
        out = math.prod(ws)
        ws[k] -= lr * (out - 2) * out / ws[k]
    return ws


@pytest.mark.parametrize("entry", ["reference", "step", "step_batch"])
def test_group_state_in_mutable_objects_is_set_back_before_every_later_pass_of_three(entry):
    """Three stages: the tensors inside group entries that the base step changes in place must be set back
    from an intact copy before pass 2 and again before pass 3 (lr 0.2 / step in every pass of step t)."""
    m = nn.Sequential(*(nn.Linear(1, 1, bias=False) for _ in range(3))).double()
    with torch.no_grad():
        for layer in m:
            layer.weight.fill_(1.0)
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64)
    base = TensorCountingSGD(m.parameters(), lr=0.2)
    opt = Backforward(m, base)

    def loss_fn(out, target):
        return 0.5 * ((out - target) ** 2).sum()

    ws = [1.0, 1.0, 1.0]
    for t in range(1, 4):
        if entry == "reference":
            reference_step(m, base, [[layer.weight] for layer in m], lambda: backward(loss_fn(m(x), y)))
        elif entry == "step":
            opt.step(lambda: backward(loss_fn(m(x), y)))
        else:
            opt.step_batch(x, y, loss_fn)
        ws = scalar_chain_by_hand(ws, 0.2 / t)
        assert [layer.weight.item() for layer in m] == pytest.approx(ws, rel=1e-12), t
        group = base.param_groups[0]
        assert torch.equal(group["step"], torch.tensor(float(t)))
        assert torch.equal(group["buffers"][0], torch.tensor([1.0, 2.0]) * t)
        assert torch.equal(group["stats"]["sum"], torch.tensor([3.0, 4.0]) * t)
        assert group["seen"] == list(range(1, t + 1))


# ---- what a step does once, not once per pass (counted) ----

def test_the_generic_engine_scans_the_autograd_graph_once_per_step(monkeypatch):
    """The stage order (and any tensor of the user's the backward reaches) is read from the first backward of
    a step; the other passes' backwards need no scan of the graph."""
    import backforward.engines as engines

    scans = []

    def counting(roots, **options):
        scans.append(len(roots))
        return engines.scan_graph.__wrapped__(roots, **options)

    counting.__wrapped__ = engines.scan_graph
    monkeypatch.setattr(engines, "scan_graph", counting)
    model, x, y = small_mlp()
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(2):
        opt.step(lambda: backward(F.cross_entropy(model(x), y)))
    assert len(opt.stages) == 3 and scans == [1, 1]


def test_a_batch_the_model_leaves_alone_is_copied_in_the_first_step_only(monkeypatch):
    """step_batch keeps a copy of the batch while it does not know whether the model modifies it."""
    import backforward.engines as engines

    kept = []
    real = engines.InputValues

    def spy(inputs, keep):
        kept.append(keep)
        return real(inputs, keep)

    monkeypatch.setattr(engines, "InputValues", spy)
    model, x, y = small_mlp()
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        opt.step_batch(x, y, F.cross_entropy)
    assert kept == [True, False, False]


def test_without_rollback_no_copy_of_the_parameters_is_kept(monkeypatch):
    import backforward.engines as engines

    saved = []
    real = engines.Rollback.save
    monkeypatch.setattr(engines.Rollback, "save", lambda self, params: saved.append(len(params)) or real(self, params))
    model, x, y = small_mlp()
    for rollback in (True, False):
        saved.clear()
        Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), rollback=rollback).step_batch(
            x, y, F.cross_entropy)
        assert saved == ([6] if rollback else [])  # every stage at once, as the step begins


# ---- found by an independent review of the overhead work ----

def test_a_loss_with_a_learnable_temperature_switched_on_later_trains_it_as_the_reference_does():
    """What the loss reaches beyond the model (a tensor of the user's) is read from every step's graph: a
    loss_fn that starts using a learnable temperature after fast steps must give it its gradient."""
    torch.manual_seed(0)
    model, stages, x, y = make("mlp3")
    model, x = model.double(), x.double()
    ref, ref_stages = clone(model, stages)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    temperature = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    ref_temperature = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    for t in range(5):
        tempered = t >= 3
        reference_step(ref, ref_opt, ref_stages, lambda tempered=tempered: backward(F.cross_entropy(
            ref(x) * (ref_temperature if tempered else 1.0), y)))
        opt.step_batch(x, y, lambda out, target, tempered=tempered: F.cross_entropy(
            out * (temperature if tempered else 1.0), target))
        assert opt._engine == "chain" or t == 0
        assert_same_params(model, ref)
    torch.testing.assert_close(temperature.grad, ref_temperature.grad, rtol=0, atol=0)


class WrappedStep:
    """Sets on an optimizer instance a step that writes a group entry (a per-call decay), as a user's wrapper
    or a library's might."""

    def __init__(self, optimizer):
        self.inner, self.optimizer = optimizer.step, optimizer

    def __call__(self, *args, **kwargs):
        for group in self.optimizer.param_groups:
            group["calls"] = group.get("calls", 0) + 1
            group["lr"] = 0.1 / group["calls"]
        return self.inner(*args, **kwargs)


def test_a_step_set_on_a_torch_optimizer_instance_is_watched_for_group_state():
    torch.manual_seed(0)
    model, stages, x, y = make("mlp3")
    ref, ref_stages = clone(model, stages)
    base, ref_base = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    base.step, ref_base.step = WrappedStep(base), WrappedStep(ref_base)
    opt = Backforward(model, base)
    for _ in range(3):
        reference_step(ref, ref_base, ref_stages, lambda: backward(F.cross_entropy(ref(x), y)))
        opt.step(lambda: backward(F.cross_entropy(model(x), y)))
        assert_same_params(model, ref)
    assert base.param_groups[0]["calls"] == ref_base.param_groups[0]["calls"] == 3


def test_without_rollback_no_copy_is_kept_between_steps():
    """rollback=False keeps nothing: copies an AMP skip or a measurement took are let go with the step."""
    torch.manual_seed(0)
    model, _, x, y = make("mlp3")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    amp = Backforward(model, torch.optim.Adam(model.parameters(), lr=0.1), grad_scaler=scaler, rollback=False)
    amp.step(amp_closure(model, x, y, scaler))
    assert amp._plan.rollback_store == {}
    opt = Backforward(model, torch.optim.Adam(model.parameters(), lr=0.1), rollback=False)
    opt.step_batch(x, y, F.cross_entropy)
    opt._group_state_changes(x, y, F.cross_entropy)
    assert opt._plan.rollback_store == {}
    opt.rollback = True
    opt.step_batch(x, y, F.cross_entropy)
    assert len(opt._plan.rollback_store) == 6 * 4  # each parameter, its two moments and its step count
    opt.rollback = False
    opt.step_batch(x, y, F.cross_entropy)
    assert opt._plan.rollback_store == {}


def test_arrays_of_another_shape_in_a_group_entry_are_not_equal():
    np = pytest.importorskip("numpy")
    assert not replay._same(np.array([5.0]), np.array([5.0, 5.0]))
    assert not replay._same(np.zeros(0), np.array([7.0]))
    assert replay._same(np.array([1.0, 2.0]), np.array([1.0, 2.0]))


# ---- CUDA random number generators, without a GPU (stand-ins for torch.cuda's functions) ----

class FakeCudaGenerators:
    """torch.cuda's generator functions replaced: what is read, and what is set back."""

    def __init__(self, monkeypatch, *, available=True, initialized=True, capturing=False):
        self.set_calls = []
        self.reads = 0
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.read)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_calls.append)

    def read(self):
        self.reads += 1
        return [f"cuda generator state {self.reads}"]


def test_every_pass_sees_the_cuda_generators_the_step_started_with(monkeypatch):
    """Dropout on a GPU draws from the CUDA generators: where CUDA is in use, the step reads them at its start
    and after its first pass, sets them back before every later pass and leaves them as after the first."""
    model, x, y = small_mlp()
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    cuda = FakeCudaGenerators(monkeypatch)
    opt.step(lambda: backward(F.cross_entropy(model(x), y)))
    start, after_first = ["cuda generator state 1"], ["cuda generator state 2"]
    assert cuda.set_calls == [start, start, after_first]  # before passes 2 and 3, then the end of the step
    snapshot = replay.rng_snapshot()
    replay.rng_restore(snapshot)
    assert snapshot[1] == ["cuda generator state 3"] and cuda.set_calls[-1] == snapshot[1]


def test_cuda_generators_are_left_alone_where_cuda_is_not_in_use_or_a_graph_is_being_captured(monkeypatch):
    # Reading them would initialise CUDA for a CPU model; during a CUDA graph capture they cannot be read.
    for initialized, capturing in ((False, False), (True, True)):
        cuda = FakeCudaGenerators(monkeypatch, initialized=initialized, capturing=capturing)
        snapshot = replay.rng_snapshot()
        replay.rng_restore(snapshot)
        assert snapshot[1] is None and cuda.reads == 0 and cuda.set_calls == []


def test_the_reference_replays_the_cuda_generators_where_cuda_is_in_use(monkeypatch):
    model, x, y = small_mlp()
    stages = [list(model[i].parameters()) for i in (0, 2, 4)]
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    cuda = FakeCudaGenerators(monkeypatch)
    reference_step(model, base, stages, lambda: backward(F.cross_entropy(model(x), y)))
    start, after_first = ["cuda generator state 1"], ["cuda generator state 2"]
    assert cuda.set_calls == [start, start, start, after_first]
    # Available but not initialised (a CPU model on a machine with a GPU): nothing read, nothing set.
    cuda = FakeCudaGenerators(monkeypatch, initialized=False)
    reference_step(model, base, stages, lambda: backward(F.cross_entropy(model(x), y)))
    assert cuda.reads == 0 and cuda.set_calls == []


def test_the_reference_refuses_a_parameter_group_the_closure_adds_before_the_pass_updates_anything():
    """The definition has no meaning for groups that appear mid-step: the reference raises in the pass whose
    closure added one, before that pass's update (stage 2 keeps its weights), not later."""
    model, x, y = small_mlp()
    stages = [list(model[i].parameters()) for i in (0, 2, 4)]
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            base.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
        return backward(F.cross_entropy(model(x), y))

    second = [p.detach().clone() for p in stages[1]]
    with pytest.raises(ValueError):
        reference_step(model, base, stages, closure)
    assert len(calls) == 2 and all(torch.equal(p, q) for p, q in zip(stages[1], second, strict=True))


class ScalesItsInputWhenAsked(nn.Module):
    """Multiplies step_batch's input by one in place in the first forward after ``scale_next`` is set (a branch
    on the input's values keeps fx from tracing it, so no trial forward takes the request)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
        self.scale_next = False

    def forward(self, x):
        if self.scale_next and bool(torch.isfinite(x).all()):
            x.mul_(1.0)
            self.scale_next = False
        return self.layers(x)


@pytest.mark.filterwarnings("ignore:backforward")  # the generic engine, once the branch refuses tracing
def test_an_input_put_back_once_is_not_copied_again_unless_modified_again():
    torch.manual_seed(0)
    model = ScalesItsInputWhenAsked()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.step_batch(x, y, F.cross_entropy)  # the model left its input alone: no copy is kept from now on
    model.scale_next = True
    with pytest.raises(RuntimeError, match="modified its input in place"):
        opt.step_batch(x, y, F.cross_entropy)
    for _ in range(2):  # a copy is kept again
        model.scale_next = True
        version = x._version
        opt.step_batch(x, y, F.cross_entropy)
        # The model's mul_ in pass 1, the copy put back before pass 2, the first pass's value put back after.
        assert x._version - version == 3


def test_clipping_without_the_meter_copies_no_gradient():
    """The gradients the step reports as measured are the stages' own (clipped in place): a copy of every
    gradient per pass is made only for the meter, which compares them before clipping."""
    model, x, y = small_mlp()
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=0.01)
    result = opt._run_batch(x, y, F.cross_entropy)
    measured = {id(g) for grads in result.measured_grads.values() for g in grads}
    assert measured == {id(p.grad) for p in model.parameters()}


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_a_forward_hook_that_backpropagates_before_the_loss_leaves_the_stage_its_gradient(order):
    """A hook on the middle layer calls backward() on a penalty of that layer's input (an activation penalty), in
    every pass before the closure's loss.backward(). Where the penalty does not reach stage k, the zeros shown for
    it after the hook's backward must not swallow the loss's gradient (added into them in place, they looked like
    an unused stage's: the stage got no update)."""
    model, ref, ref_stages, ref_opt, x, y = penalised_mlp_beside_reference(order)
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), order=order)
    for _ in range(2):
        reference_step(ref, ref_opt, ref_stages, lambda: backward(F.cross_entropy(ref(x), y)))
        opt.step(lambda: backward(F.cross_entropy(model(x), y)))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters(), strict=True))


class CentersLazily(nn.Module):
    """A running mean held in a buffer that is None until the first forward sets it (or, ``register``, a buffer the
    first forward registers)."""

    def __init__(self, register: bool = False):
        super().__init__()
        self.register = register
        if not register:
            self.register_buffer("run", None)

    def forward(self, h):
        mean = h.detach().mean(0)
        if getattr(self, "run", None) is None:
            if self.register:
                self.register_buffer("run", mean)
            else:
                self.run = mean
        else:
            self.run = 0.5 * self.run + 0.5 * mean
        return h - self.run


@pytest.mark.parametrize("register", [False, True])
@pytest.mark.parametrize("entry", ["reference", "closure", "batch"])
def test_a_buffer_a_forward_sets_is_unset_in_every_pass_and_as_the_first_pass_set_it_after(entry, register):
    """Every pass sees the buffers of the step's start, a None one (or none at all) too: each pass sets it from its
    own batch statistics alone, and the step leaves pass 1's value, worked out here by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), CentersLazily(register), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with torch.no_grad():
        first = torch.relu(model[0](x)).mean(0)
    twin = copy.deepcopy(model)  # each pass by hand: the buffer unset, the stages before it moved
    losses = []
    for k in (0, 3, 5):
        twin[2].__init__(register)
        loss = F.cross_entropy(twin(x), y)
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, list(twin[k].parameters()))
        with torch.no_grad():
            for p, g in zip(twin[k].parameters(), grads, strict=True):
                p.add_(g, alpha=-0.3)  # as SGD adds it
    twin[2]._buffers["run"] = first  # as pass 1 left it
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    stages = [list(model[k].parameters()) for k in (0, 3, 5)]
    if entry == "reference":
        got = reference_step(model, opt, stages, lambda: backward(F.cross_entropy(model(x), y)))
    else:
        bf = Backforward(model, opt)
        if entry == "closure":
            bf.step(lambda: backward(F.cross_entropy(model(x), y)))
        else:
            bf.step_batch(x, y, F.cross_entropy)
        got = bf.last_losses
    assert got == losses
    assert torch.equal(model[2].run, first) and "run" in model[2]._buffers
    assert_same_params(model, twin)


@pytest.mark.parametrize("register", [False, True])
def test_a_failed_step_unsets_a_buffer_its_forward_set(register):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), CentersLazily(register), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    calls = []

    def fails_in_pass_2(out, target):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("pass 2 fails")
        return F.cross_entropy(out, target)

    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3))
    with pytest.raises(RuntimeError, match="pass 2 fails"):
        bf.step_batch(x, y, fails_in_pass_2)
    assert model[1]._buffers == ({} if register else {"run": None})


@pytest.mark.parametrize("entry", ["closure", "batch"])
def test_a_step_run_inside_autocast_casts_each_pass_weights_anew(entry):
    """Autocast keeps its casts of the weights until its region ends: a step run inside one would compute every
    pass at the weights the step began with, and read a cast made before the step (by the model's reading) as a
    weight's first use, ordering a BatchNorm (not cast) after the layers that follow it. Each pass equals a pass
    run in its own autocast region, and a step after a failed one starts from the weights put back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)

    def in_its_own_region():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(ref(x), y)
        return backward(loss)

    expected = []  # each pass in its own region (none around the reference's steps)
    for _ in range(2):
        losses = reference_step(ref, ref_opt, [list(ref[k].parameters()) for k in (0, 1, 3, 5)], in_its_own_region)
        expected.append((losses, copy.deepcopy(ref)))
    calls = []

    def fails_in_step_2_pass_2(out, target):
        calls.append(1)
        if len(calls) == 5:  # three passes of step 1, then step 2's second
            raise RuntimeError("pass 2 fails")
        return F.cross_entropy(out, target)

    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3))
    got = []
    with torch.autocast("cpu", dtype=torch.bfloat16):  # one region around every step
        for t in range(3):
            with contextlib.suppress(RuntimeError) if t == 1 else contextlib.nullcontext():
                if entry == "closure":
                    bf.step(lambda: backward(fails_in_step_2_pass_2(model(x), y)))
                else:
                    bf.step_batch(x, y, fails_in_step_2_pass_2)
            if t != 1:
                got.append((bf.last_losses, bf.stage_names, copy.deepcopy(model)))
    for (losses, ref), (last_losses, names, stepped) in zip(expected, got, strict=True):
        assert last_losses == losses and len(set(losses)) == 4 and names == ["0", "1", "3", "5"]
        assert_same_params(stepped, ref)


class SharesARunningMean(nn.Module):
    """Two BatchNorms holding one running_mean tensor (a buffer two modules share)."""

    def __init__(self):
        super().__init__()
        self.a, self.fc1, self.b, self.fc2 = nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.b.running_mean = self.a.running_mean

    def forward(self, x):
        return self.fc2(self.b(self.fc1(self.a(x))))


@pytest.mark.parametrize("how", ["reference", "step", "step_batch"])
def test_a_buffer_two_modules_share_stays_shared_and_advances_as_in_one_plain_forward(how):
    torch.manual_seed(0)
    model = SharesARunningMean()  # (.double() would make two tensors of the shared one)
    plain = copy.deepcopy(model)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if how == "reference":
        reference_step(model, opt, [list(m.parameters()) for m in (model.a, model.fc1, model.b, model.fc2)], closure)
    else:
        bf = Backforward(model, opt)
        bf.step(closure) if how == "step" else bf.step_batch(x, y, nn.functional.cross_entropy)
    plain(x)  # one plain forward at θ_t: what the running statistics record in a step
    assert model.a.running_mean is model.b.running_mean
    for got, expected in zip(model.buffers(), plain.buffers(), strict=True):
        assert torch.equal(got, expected)
