"""Averaging over processes, checked in one process: each rank a thread, ``torch.distributed`` a stand-in.

The spawned-process tests (test_distributed.py) run real gloo groups and are slow; these run in the fast
suite. Two replicas of a model, each on half of a batch, must step like one model on the whole batch: the
reference step with the loss averaged over the two halves.
"""

import copy
import threading
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
from conftest import Routed
from torch import nn

from backforward import Backforward, distributed, reference_step

F = nn.functional


class ThreadGroup:
    """A process group of threads: ``all_reduce`` waits for every rank, then sums (or takes the maximum).

    ``group`` is what the library must pass on to torch.distributed: None (the world) or a group object.
    """

    def __init__(self, world: int, group=None):
        self.world = world
        self.group = group
        self.cond = threading.Condition()
        self.rounds: dict[int, dict[int, torch.Tensor]] = {}
        self.failed = False
        self.local = threading.local()
        self.calls = [0] * world

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: self._check(group) or self.world)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: self.local.rank)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def _check(self, group) -> None:
        if group is not self.group:
            raise ValueError(f"a call on group {group!r}, not the step's {self.group!r}")

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        self._check(group)
        rank = self.local.rank
        with self.cond:
            call = self.calls[rank]
            self.calls[rank] += 1
            slots = self.rounds.setdefault(call, {})
            slots[rank] = tensor.clone()
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: len(slots) == self.world or self.failed, timeout=20):
                raise TimeoutError(f"all-reduce #{call}: a rank never came")
            if len(slots) < self.world:
                raise RuntimeError(f"all-reduce #{call}: another rank failed")
        stacked = torch.stack([slots[r] for r in range(self.world)])
        if op == dist.ReduceOp.SUM:
            tensor.copy_(stacked.sum(0))
        elif op == dist.ReduceOp.MAX:
            tensor.copy_(stacked.amax(0))
        else:
            raise NotImplementedError(op)

    def run(self, work):
        """``work(rank)`` in one thread per rank; their results, or the exception each raised."""
        results: list = [None] * self.world

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = work(rank)
            except BaseException as e:  # noqa: BLE001 - handed to the test's thread
                results[rank] = e
                with self.cond:  # ranks waiting for this one stop waiting
                    self.failed = True
                    self.cond.notify_all()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a rank hung"
        return results


class Residual(nn.Module):
    """h + tanh(extra(h)) where ``use_extra`` is set (a stage only some ranks use); ``unused`` is never called."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(6, 6)
        self.unused = nn.Linear(6, 3)
        self.use_extra = False

    def forward(self, h):
        return h + torch.tanh(self.extra(h)) if self.use_extra else h


def two_paths():
    """stem -> tanh -> the residual branch -> head, as a chain: torch.fx would patch torch globally while it
    traced one rank's model, under the other ranks' forwards."""
    return nn.Sequential(OrderedDict(stem=nn.Linear(4, 6), act=nn.Tanh(), residual=Residual(), head=nn.Linear(6, 3)))


def stages_of(model):
    return [model.stem, model.residual.extra, model.head, model.residual.unused]


def problem():
    torch.manual_seed(0)
    model = two_paths()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)


def halves(x, y):
    return [(x[:6], y[:6]), (x[6:], y[6:])]


def reference_run(model, x, y, extra_on, steps, make_base):
    """One process, the whole batch: the loss is the mean of the halves' losses, each with its rank's forward."""
    base = make_base(model)
    stages = [list(m.parameters()) for m in stages_of(model)]
    losses = []
    for _ in range(steps):
        def closure():
            total = 0
            for (xs, ys), on in zip(halves(x, y), extra_on, strict=True):
                model.residual.use_extra = on
                total = total + F.cross_entropy(model(xs), ys)
            loss = total / len(extra_on)
            loss.backward()
            return loss

        losses.append(reference_step(model, base, stages, closure))
    return losses


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9)


@pytest.mark.parametrize("extra_on", [(False, False), (False, True)], ids=["same-forward", "one-rank-uses-extra"])
def test_two_ranks_step_like_one_process_on_the_whole_batch(monkeypatch, extra_on):
    model, x, y = problem()
    expected = copy.deepcopy(model)
    reference_losses = reference_run(expected, x, y, extra_on, steps=2, make_base=sgd)
    group = ThreadGroup(2, group=object())  # a group of the user's, not the world
    group.install(monkeypatch)

    def work(rank):
        replica = copy.deepcopy(model)
        replica.residual.use_extra = extra_on[rank]
        bf = Backforward(replica, sgd(replica), stages=stages_of(replica), process_group=group.group,
                         check_replicas=True)
        xs, ys = halves(x, y)[rank]
        losses = []
        for _ in range(2):
            bf.step_batch(xs, ys, F.cross_entropy)
            losses.append(bf.last_losses)
        return replica, bf, losses

    results = group.run(work)
    for result in results:
        assert not isinstance(result, BaseException), result
        replica, bf, losses = result
        for (name, p), q in zip(replica.named_parameters(), expected.parameters(), strict=True):
            # Half-batch means averaged are not the full-batch mean bit for bit.
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
        # Every rank reports the pass losses of the whole batch, as one process would.
        assert losses == [pytest.approx(ref, rel=1e-5) for ref in reference_losses]
        # A stage that no rank used gets no gradient and no update; one that any rank used gets the average.
        assert all(p.grad is None for p in replica.residual.unused.parameters())
        assert all(p not in bf.state for p in replica.residual.unused.parameters())
        used_extra = any(extra_on)
        assert all((p.grad is not None) == used_extra for p in replica.residual.extra.parameters())
        if used_extra:
            for p, q in zip(replica.residual.extra.parameters(), expected.residual.extra.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
    # Per step: one all-reduce per pass (four stages) and one for the replica check.
    assert group.calls == [2 * (4 + 1)] * 2


def test_the_ics_meter_averages_the_start_gradients_over_ranks(monkeypatch):
    """G_k at θ_t, averaged like G'_k: the gradient of the whole batch's loss, worked out by autograd."""
    model, x, y = problem()
    plain = copy.deepcopy(model)
    loss = sum(F.cross_entropy(plain(xs), ys) for xs, ys in halves(x, y)) / 2
    loss.backward()
    expected_norms = [float(torch.cat([p.grad.reshape(-1) for p in m.parameters()]).norm())
                      for m in (plain.stem, plain.head)]
    group = ThreadGroup(2)
    group.install(monkeypatch)

    def work(rank):
        replica = copy.deepcopy(model)
        bf = Backforward(replica, torch.optim.SGD(replica.parameters(), lr=0.5), track_ics=True)
        bf.step_batch(*halves(x, y)[rank], F.cross_entropy)
        return bf.last_report

    for report in group.run(work):
        assert not isinstance(report, BaseException), report
        assert report.stage_names == ["stem", "head", "residual.extra", "residual.unused"]
        assert report.grad_norm[:2] == pytest.approx(expected_norms, rel=1e-5)
        assert report.grad_shift[0] == 0.0
        assert report.grad_norm[2:] == [0.0, 0.0]


def test_the_replica_check_raises_on_every_rank_when_parameters_differ(monkeypatch):
    model, x, y = problem()
    group = ThreadGroup(2)
    group.install(monkeypatch)

    def work(rank):
        replica = copy.deepcopy(model)
        if rank == 1:
            with torch.no_grad():
                replica.head.bias.add_(0.5)
        bf = Backforward(replica, torch.optim.SGD(replica.parameters(), lr=0.1), check_replicas=True)
        bf.step_batch(*halves(x, y)[rank], F.cross_entropy)

    for result in group.run(work):
        assert isinstance(result, RuntimeError) and "parameters differ across processes" in str(result), result


@pytest.mark.parametrize("debug", [dist.DebugLevel.OFF, dist.DebugLevel.INFO])
def test_by_default_replicas_are_checked_in_torch_distributed_debug_mode(monkeypatch, debug):
    model, x, y = problem()
    group = ThreadGroup(2)
    group.install(monkeypatch)
    monkeypatch.setattr(dist, "get_debug_level", lambda: debug)

    def work(rank):
        replica = copy.deepcopy(model)
        if rank == 1:
            with torch.no_grad():
                replica.head.bias.add_(0.5)
        bf = Backforward(replica, torch.optim.SGD(replica.parameters(), lr=0.1))  # check_replicas left unset
        bf.step_batch(*halves(x, y)[rank], F.cross_entropy)
        return "stepped"

    results = group.run(work)
    if debug == dist.DebugLevel.OFF:
        assert results == ["stepped", "stepped"]
    else:
        assert all(isinstance(r, RuntimeError) and "parameters differ across processes" in str(r) for r in results)


@pytest.mark.parametrize("rank1, checksums, low, high", [
    ((0.5, 0.0), None, None, None),
    ((0.25, 0.25), [3.5, 3.125], [3.5, 3.125], [3.5, 3.25]),  # the same sum: only the sum of squares tells
    ((0.5, 0.5), [4.0, 3.5], [3.5, 3.25], [4.0, 3.5]),
], ids=["same", "same-sum", "other-sum"])
def test_the_replica_checksums(monkeypatch, rank1, checksums, low, high):
    """Rank 0 holds (0.5, 0) and (1, 1, 1): sum 3.5, sum of squares 3.25; rank 1 holds ``rank1`` and (1, 1, 1)."""
    group = ThreadGroup(2)
    group.install(monkeypatch)
    values = [torch.tensor([0.5, 0.0]), torch.tensor(rank1)]

    def work(rank):
        distributed.check_replicas([nn.Parameter(values[rank].clone()), nn.Parameter(torch.ones(3))])
        return "agree"

    results = group.run(work)
    if checksums is None:
        assert results == ["agree", "agree"]
        return
    for rank, (result, mine) in enumerate(zip(results, [[3.5, 3.25], checksums], strict=True)):
        assert isinstance(result, RuntimeError), result
        assert str(result) == (f"parameters differ across processes after the step (rank {rank}: checksums {mine}, "
                               f"range over ranks {low} .. {high})")


def test_one_process_is_no_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    assert distributed.grad_averager() is None
    distributed.check_replicas([nn.Parameter(torch.ones(2))])  # nothing to compare with: no all-reduce


def test_averaging_leaves_the_loss_tensors_the_closure_returned_alone(monkeypatch):
    """A stand-in for a second process whose gradients and losses are zero: averaging halves them. The step
    reports the averaged losses; the tensors the closure returned (and may hold) keep this process's values."""
    import backforward.optimizer as optimizer_module

    def halve(tensors):
        for t in tensors[:-1]:  # the last tensor says which parameters had a gradient: a sum, kept
            t.mul_(0.5)

    monkeypatch.setattr(optimizer_module.distributed, "grad_averager", lambda group: halve)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    plain = float(F.cross_entropy(model(x), y).detach())
    returned = []

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        returned.append(loss)
        return loss

    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    first = opt.step(closure)
    assert float(first) == pytest.approx(0.5 * plain, rel=1e-12)
    assert float(returned[0].detach()) == pytest.approx(plain, rel=1e-12)
    assert opt.last_losses == pytest.approx([0.5 * float(t.detach()) for t in returned], rel=1e-12)


def test_across_processes_the_fast_engine_keeps_the_order_every_rank_read(monkeypatch):
    """Read alike on both ranks, the order is kept when one rank's batch would order the stages otherwise: run
    again alone, that rank would meet the other's all-reduces with another stage's gradients (README: such a
    model needs explicit stages)."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(route=Routed(4, 6), act=nn.Tanh(), head=nn.Linear(6, 3)))
    x, y = torch.randn(12, 4).abs(), torch.randint(0, 3, (12,))
    group = ThreadGroup(2)
    group.install(monkeypatch)

    def work(rank):
        replica = copy.deepcopy(model)
        bf = Backforward(replica, sgd(replica))
        xs, ys = halves(x, y)[rank]
        for t in range(3):
            bf.step_batch(-xs if rank == 1 and t == 2 else xs, ys, F.cross_entropy)
        return bf.stage_names, bf._engine

    results = group.run(work)
    assert results == [(["route.first", "head", "route.second"], "chain")] * 2
