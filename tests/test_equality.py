"""When a value counts as unchanged: the helpers that compare what a step started with to what it holds now.

``replay._same`` (a base optimizer's group-level entries: did its step change one?), ``reference._equal``
(the same question in the reference step, which shares no code with the engines) and
``replay.BufferValues.changed`` (did a buffer move?). Saying "unchanged" of a changed value would leave it
unreplayed; the cases below are those where ``==`` alone would say so.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from backforward.reference import _equal
from backforward.replay import BufferValues, _same

COMPARISONS = [pytest.param(_same, id="replay"), pytest.param(_equal, id="reference")]


@pytest.mark.parametrize("same", COMPARISONS)
def test_a_numpy_number_and_a_tensor_of_its_value_are_not_the_same(same):
    # A numpy scalar has shape () as a 0-d tensor does, and == between them gives a tensor holding True: an entry
    # that became a tensor (or stopped being one) is still a change of what the group holds.
    number, tensor = np.float64(0.5), torch.tensor(0.5, dtype=torch.float64)
    assert number == tensor  # what == alone would conclude
    assert not same(number, tensor)
    assert not same(tensor, number)


@pytest.mark.parametrize("same", COMPARISONS)
def test_arrays_of_different_shapes_are_not_the_same(same):
    # == would broadcast or fail; an entry whose shape changed is changed, whatever it holds.
    assert not same(np.zeros(2), np.zeros(3))
    assert not same(np.zeros(3), np.zeros(2))
    assert same(np.zeros(3), np.zeros(3))


@dataclass
class Schedule:
    """A group entry holding a tensor inside a plain object: its == asks bool() of an elementwise comparison."""

    warmup: torch.Tensor
    scale: float


def test_an_entry_whose_comparison_raises_counts_as_changed():
    before, after = Schedule(torch.zeros(3), 1.0), Schedule(torch.tensor([0.0, 1.0, 2.0]), 1.0)
    with pytest.raises(RuntimeError):  # the comparison itself raises: no answer to trust
        before == after  # noqa: B015
    assert not _same(before, after)


class Marks(nn.Module):
    def __init__(self, values: list[float]):
        super().__init__()
        self.register_buffer("marks", torch.tensor(values))


@pytest.mark.parametrize("start, now", [([float("nan"), 1.0], [0.0, 1.0]), ([0.0, 1.0], [float("nan"), 1.0])])
def test_a_nan_on_one_side_only_is_a_changed_buffer(start, now):
    # NaN where NaN was is no change (NaN != NaN); a number becoming NaN, or NaN becoming a number, is one.
    model = Marks(start)
    values = BufferValues(list(model.modules()))
    assert not values.changed()
    with torch.no_grad():
        model.marks.copy_(torch.tensor(now))
    assert values.changed()
