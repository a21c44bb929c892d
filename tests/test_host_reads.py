"""No host-device synchronisation inside a step: nothing reads a tensor's value on the host between passes."""

import pytest
import torch
from awkward import CASES
from conftest import make
from torch import nn
from torch.overrides import TorchFunctionMode

from backforward import Backforward

F = nn.functional
HOST_READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"}


class HostReads(TorchFunctionMode):
    """Records every call that copies a tensor's value to the host (a sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def steps(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return {"step": lambda opt: opt.step(closure), "step_batch": lambda opt: opt.step_batch(x, y, F.cross_entropy)}


@pytest.mark.parametrize("model_name", ["dropout", "residual", "batchnorm"])  # chain, generic, buffers
@pytest.mark.parametrize("entry", ["step", "step_batch"])
def test_a_step_reads_nothing_on_the_host_but_its_one_finiteness_check(model_name, entry):
    model, _, x, y = make(model_name)
    run = steps(model, x, y)[entry]
    for check_finite, expected in ((False, []), (True, ["item"])):
        opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                          check_finite=check_finite)
        run(opt)  # the first step reads the stage order from the graph
        with HostReads() as reads:
            run(opt)
            run(opt)
        assert reads.calls == expected * 2, (check_finite, reads.calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_name", ["dropout", "residual", "batchnorm"])  # chain, generic, buffers
@pytest.mark.parametrize("entry", ["step", "step_batch"])
def test_a_cuda_step_makes_no_sync_but_its_one_finiteness_check(model_name, entry):
    import warnings

    model, _, x, y = make(model_name)
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    run = steps(model, x, y)[entry]
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), check_finite=False)
    run(opt)  # the first step reads the stage order from the graph
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(opt)
        run(opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    opt.check_finite = True
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) == 1 and syncs[0].filename.endswith("engines.py"), [(w.filename, w.lineno) for w in syncs]


def test_host_reads_are_seen_by_the_recorder():
    # The recorder itself works: last_losses converts on access, one tolist.
    model, _, x, y = make("mlp3")
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.step_batch(x, y, F.cross_entropy)
    with HostReads() as reads:
        losses = opt.last_losses
    assert reads.calls == ["tolist"] and len(losses) == 3


def test_the_graph_of_a_transformer_step_is_read_without_host_reads():
    case = CASES["transformer_train"]()
    opt = Backforward(case.model, torch.optim.SGD(case.model.parameters(), lr=0.1), check_finite=False)
    x, y = case.batches[0]
    opt.step_batch(x, y, case.loss_fn)
    with HostReads() as reads:
        opt.step_batch(x, y, case.loss_fn)
    assert reads.calls == []


def test_a_step_captured_for_a_cuda_graph_reads_nothing_on_the_host_and_keeps_nothing_to_undo():
    """What ``CapturedStep`` relies on, checked where it can be without a GPU: a step run for capture makes no
    finiteness read, no rollback copy and no group-state replay (it refuses optimizers that need one), and
    does not decide from it whether the model modifies its input."""
    model, _, x, y = make("mlp3")
    base = torch.optim.SGD(model.parameters(), lr=0.1)

    def count(opt, args, kwargs):  # group-level state a hook keeps: a step outside capture counts it once
        opt.param_groups[0]["calls"] = opt.param_groups[0].get("calls", 0) + 1

    base.register_step_post_hook(count)
    opt = Backforward(model, base, stages=[model[0], model[2], model[4]])  # the order is known: the chain runs
    opt._graph(x, list(model.modules()))  # the model is read before (CapturedStep's warm-up steps read it)
    with HostReads() as reads:
        opt._run_batch(x, y, F.cross_entropy, capturing=True)
    assert opt._engine == "chain" and reads.calls == []
    assert opt._plan.rollback_store == {} and opt._plan.inputs_modified is None
    assert base.param_groups[0]["calls"] == 3  # not replayed: once per pass
    opt.step_batch(x, y, F.cross_entropy)
    assert base.param_groups[0]["calls"] == 4  # outside capture: once per step
