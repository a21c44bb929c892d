"""The fast engine on chains (nn.Sequential): the same answer as the reference, with the recomputation the cost
model promises."""

import pytest
import torch
from awkward import RunningCenter
from conftest import BASES, Traced, assert_same_params, clone, linear_stages
from torch import nn
from torch.utils.checkpoint import checkpoint

from backforward import Backforward, reference_step
from backforward.graph import GraphEngine, chain_graph

F = nn.functional


def count_calls(model: nn.Sequential) -> list[int]:
    counts = [0] * len(model)
    for i, child in enumerate(model):
        child.register_forward_pre_hook(lambda _m, _a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def chain_plan(model: nn.Sequential, stages: list[nn.Module], order: list[int]):
    """Per pass: the children it runs, and the child outputs it reads from an earlier pass (child indices)."""
    found = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1), stages=stages).stages
    engine = GraphEngine(chain_graph(model), found, order)
    # Op i + 1 calls child i; a loaded value u + 1 is the output of child u.
    runs = [sorted(i - 1 for i in ops if 0 < i <= len(model)) for ops in engine.recomputed]
    loads = [[u - 1 for u in plan.loads] for plan in engine._plans]
    return runs, loads


def test_chain_plan_by_hand():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    # Stages at children 0, 2, 4, forward order: pass 1 runs every child; pass 2 from child 0 (stage 1 moved);
    # pass 3 from child 2 (stage 2 moved), reading child 1's output, kept by pass 2.
    linears = [model[0], model[2], model[4]]
    assert chain_plan(model, linears, [0, 1, 2]) == ([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [2, 3, 4]], [[], [], [1]])
    # Reverse: stage 3, then 2, then 1. Pass 2 must reach stage 2 at child 2, reading child 1's output from
    # pass 1; pass 3 reaches stage 1 at child 0.
    assert chain_plan(model, linears, [2, 1, 0]) == ([[0, 1, 2, 3, 4], [2, 3, 4], [0, 1, 2, 3, 4]], [[], [1], []])
    # Two stages in one child (a block): both passes after the block's first stage moved start at the block,
    # reading child 0's output, kept by pass 2.
    block = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), nn.Linear(3, 3))
    stages = [block[0], block[1][0], block[1][1], block[2]]
    assert chain_plan(block, stages, [0, 1, 2, 3]) == ([[0, 1, 2], [0, 1, 2], [1, 2], [1, 2]],
                                                       [[], [], [0], [0]])


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_fast_pass_recomputes_only_from_the_moved_stage(depth):
    layers = [nn.Linear(5, 5)]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.Linear(5, 5)]
    model = nn.Sequential(*layers)
    x, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    counts = count_calls(model)  # hooks added later would have the model read again
    bf.step_batch(x, y, F.cross_entropy)  # first step: finds the order with the generic engine
    counts[:] = [0] * len(model)
    bf.step_batch(x, y, F.cross_entropy)
    n = depth + 1
    # Linear at child 2j is stage j+1; pass k (k >= 2) starts at stage k-1's child.
    expected = [0] * len(model)
    for k in range(1, n + 1):
        start = 0 if k == 1 else 2 * (k - 2)
        for i in range(start, len(model)):
            expected[i] += 1
    assert counts == expected
    assert counts[0] == min(2, n) and counts[-1] == n


def test_truncated_backward_computes_no_other_weight_gradient():
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    bf.step_batch(x, y, F.cross_entropy)
    seen = []
    for i in (0, 2, 4):
        model[i].weight.register_hook(lambda g, i=i: seen.append(i))
    bf.step_batch(x, y, F.cross_entropy)
    assert seen == [0, 2, 4]  # one weight gradient per pass, its own stage's, in order


def inplace_block_model():
    # Each block's in-place dropout modifies its own input, the cached input of a stage boundary
    # (and, unlike an in-place ReLU, applying it twice is not the same as once).
    return nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Dropout(0.5, inplace=True), nn.Linear(6, 6)),
                         nn.Sequential(nn.Dropout(0.5, inplace=True), nn.Linear(6, 3)))


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("base", list(BASES))
def test_fast_engine_with_inplace_modules_equals_reference(order, base):
    torch.manual_seed(0)
    model = inplace_block_model()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    stages = linear_stages(model)
    ref, ref_stages = clone(model, stages)
    ref_opt = BASES[base](ref.parameters())
    bf = Backforward(model, BASES[base](model.parameters()), order=order)
    for t in range(4):
        torch.manual_seed(t)
        reference_step(ref, ref_opt, ref_stages[::-1] if order == "reverse" else ref_stages,
                       lambda: _backward(F.cross_entropy(ref(x), y)))
        torch.manual_seed(t)
        bf.step_batch(x, y, F.cross_entropy)
    assert_same_params(model, ref)


def test_dropout_and_batchnorm_chain_with_blocks_equals_reference():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.4)),
                          nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    stages = linear_stages(model)
    ref, ref_stages = clone(model, stages)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    bf = Backforward(model, torch.optim.Adam(model.parameters(), lr=0.05))
    for t in range(4):
        torch.manual_seed(100 + t)
        reference_step(ref, ref_opt, ref_stages, lambda: _backward(F.cross_entropy(ref(x), y)))
        torch.manual_seed(100 + t)
        bf.step_batch(x, y, F.cross_entropy)
    assert bf._engine == "chain"
    assert_same_params(model, ref)


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("traced", [False, True])
def test_random_numbers_drawn_as_many_as_the_data_asks_equal_reference(order, traced):
    """RReLU draws one number per non-positive input (on CPU): once a stage before it moved, a pass draws another
    count, so a later pass must start its recomputation where the pass before it stood, not where pass 1 did."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.RReLU(), nn.Linear(6, 6), nn.RReLU(), nn.Linear(6, 6), nn.Linear(6, 3))
    model = Traced(model) if traced else model
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    stages = linear_stages(model)
    ref, ref_stages = clone(model, stages)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.5), order=order)
    for t in range(3):
        torch.manual_seed(100 + t)
        losses = reference_step(ref, ref_opt, ref_stages[::-1] if order == "reverse" else ref_stages,
                                lambda: _backward(F.cross_entropy(ref(x), y)))
        torch.manual_seed(100 + t)
        bf.step_batch(x, y, F.cross_entropy)
        assert bf.last_losses == losses
        assert_same_params(model, ref)
    assert bf._engine == ("graph" if traced else "chain")


def test_a_sequential_with_its_own_forward_is_traced_not_chained():
    class Doubling(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    for model, engine in ((nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), "chain"),
                          (Doubling(nn.Linear(3, 3), nn.Linear(3, 2)), "graph")):
        opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
        opt.step_batch(x, y, F.cross_entropy)
        assert opt._engine == "generic"  # the first step finds the stage order
        opt.step_batch(x, y, F.cross_entropy)
        assert opt._engine == engine


def chain_beside_reference(model: nn.Sequential, stages: list[list[nn.Parameter]], x, y, steps: int = 3, **close):
    """step_batch on the default stages beside reference_step on ``stages``, equal after every step."""
    ref, ref_stages = clone(model, stages)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(steps):
        reference_step(ref, ref_opt, ref_stages, lambda: _backward(F.cross_entropy(ref(x), y)))
        bf.step_batch(x, y, F.cross_entropy)
        assert_same_params(model, ref, **close)
    assert bf._engine == "chain"


def test_shared_children_stay_on_the_fast_engine_and_exact():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(4, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    chain_beside_reference(model, [list(model[0].parameters()), list(shared.parameters()),
                                   list(model[5].parameters())], x, y)


def _backward(loss):
    loss.backward()
    return loss


def test_after_an_inplace_module_changed_a_cached_input_later_steps_keep_copies_and_their_plan():
    torch.manual_seed(0)
    model = inplace_block_model()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    counts = count_calls(model)  # hooks added later would have the model read again
    bf.step_batch(x, y, F.cross_entropy)  # generic: finds the order
    bf.step_batch(x, y, F.cross_entropy)  # chain: the in-place dropout changes a cached input; pass 3 recomputes
    counts[:] = [0] * len(model)
    bf.step_batch(x, y, F.cross_entropy)
    # Stages at children 0, 1, 2: pass 1 runs all, pass 2 starts at child 0, pass 3 at child 1 (from a copy).
    assert counts == [2, 3, 3]


def test_a_value_modified_in_place_is_handed_as_a_copy_to_every_reader_but_its_last():
    # Child 1 holds two stages behind an in-place dropout: passes 3 and 4 both read child 0's output, kept
    # from pass 2. Pass 3's dropout must modify a copy, or pass 4 finds the kept value changed and runs whole.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Dropout(0.5, inplace=True), nn.Linear(6, 6), nn.Tanh(),
                                                         nn.Linear(6, 6)), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    stages = linear_stages(model)
    ref, ref_stages = clone(model, stages)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    counts = count_calls(model)  # hooks added later would have the model read again
    for t in range(3):  # generic (finds the order), chain (finds the in-place change), chain with copies
        if t == 2:
            counts[:] = [0] * len(model)
        torch.manual_seed(t)
        reference_step(ref, ref_opt, ref_stages, lambda: _backward(F.cross_entropy(ref(x), y)))
        torch.manual_seed(t)
        bf.step_batch(x, y, F.cross_entropy)
    assert bf._engine == "chain"
    # Four stages: pass 1 runs every child, pass 2 starts at child 0, passes 3 and 4 at child 1.
    assert counts == [2, 4, 4]
    assert_same_params(model, ref)



# ---- found by the second mutation run ----

def test_two_children_sharing_a_buffer_are_recomputed_together():
    """One normaliser at two places in the chain: its second call reads the centre its first call moved, so a
    pass that recomputes the second call must recompute the first (its input is kept), as a plain forward runs
    both."""
    torch.manual_seed(0)
    center = RunningCenter(4)  # reads its buffer and moves it in place
    model = nn.Sequential(nn.Linear(4, 4), center, nn.Tanh(), nn.Linear(4, 4), center, nn.Tanh(),
                          nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    chain_beside_reference(model, [list(model[i].parameters()) for i in (0, 3, 6)], x, y, atol=1e-12)


def test_step_batch_reads_its_own_stage_order_again_after_a_closure_step_gave_another():
    """A step(closure) whose closure uses layer 2 before layer 0 orders the default stages by its own data
    flow; the next step_batch runs model.forward, so it reads the order again (the generic engine), and the
    chain engine then runs that order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    opt = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.3))
    for _ in range(2):
        opt.step_batch(x, y, F.cross_entropy)
    assert opt._engine == "chain" and opt.stage_names == ["0", "2", "4"]
    opt.step(lambda: _backward(F.cross_entropy(model[4](torch.tanh(model[0](torch.tanh(model[2](x))))), y)))
    assert opt.stage_names == ["2", "0", "4"]
    for engine in ("generic", "chain"):
        ref = clone(model, [])[0]
        opt.step_batch(x, y, F.cross_entropy)
        assert opt._engine == engine and opt.stage_names == ["0", "2", "4"]
        reference_step(ref, torch.optim.SGD(ref.parameters(), lr=0.3),
                       [list(ref.get_submodule(name).parameters()) for name in ("0", "2", "4")],
                       lambda ref=ref: _backward(F.cross_entropy(ref(x), y)))
        assert_same_params(model, ref)


class MaybeCheckpointed(nn.Module):
    """A chain child that starts checkpointing itself reentrantly once ``use_ckpt`` is set."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.use_ckpt = False

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=True) if self.use_ckpt else self.inner(x)


def test_a_child_that_starts_hiding_its_parameters_after_fast_steps_still_equals_the_reference():
    """The chain calls its children whole: each step reads the autograd graph for what they hide."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), MaybeCheckpointed(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    stages = [list(model[0].parameters()), list(model[2].inner[0].parameters()), list(model[3].parameters())]
    ref, ref_stages = clone(model, stages)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     stages=[model[0], model[2].inner[0], model[3]])
    for t in range(5):
        if t == 3:
            model[2].use_ckpt = ref[2].use_ckpt = True
        reference_step(ref, ref_opt, ref_stages, lambda: _backward(F.cross_entropy(ref(x), y)))
        bf.step_batch(x, y, F.cross_entropy)
        assert_same_params(model, ref)
    assert bf._engine == "chain"
