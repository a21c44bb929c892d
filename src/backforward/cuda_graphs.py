"""A whole Backforward step captured as one CUDA graph, replayed on new batches of the same shape.

At the paper's sizes a GPU spends most of a Backforward step waiting for the host: every
pass launches its forward, backward and base-update kernels from Python. Capturing the
step once (all n passes and base updates) and replaying it removes that host work; it
pays where kernels are small and many (narrow or shallow models, small batches), and
not for large matrices, where the device is busy anyway.

Capture is exact only where the step's host logic is the same every step, so it is
refused with a clear error (before anything is captured) for: a model not on CUDA, a
forward that draws random numbers (dropout: the masks of later passes are replayed from
the generator's state, which a graph cannot rewind), a base optimizer that keeps
group-level state, the ICS meter, a GradScaler, several processes, and inputs whose
shape differs from the captured ones; and, once captured, for a base optimizer that created
or replaced its state inside the capture (no eager step yet, or state it does not change in
place), which every replay would do again. The step runs without the rollback copy and
without the finiteness check (both need the host); check the returned loss yourself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .optimizer import Backforward
from .replay import BufferValues, rng_restore, rng_snapshot


class CapturedStep:
    """``opt.step_batch(inputs, targets, loss_fn)`` as a CUDA graph: ``captured(x, y)`` replays it.

    Capture after at least one eager step (which creates the base optimizer's state and reads
    the stage order). ``warmup`` steps on a side stream run first and are undone. Returns, on
    each call, the first pass's loss (a tensor the next replay overwrites).
    """

    def __init__(self, optimizer: Backforward, inputs: torch.Tensor, targets: torch.Tensor,
                 loss_fn: Callable[[Any, Any], torch.Tensor], warmup: int = 3):
        self.optimizer = optimizer
        params = [p for s in optimizer.stages for p in s.params]
        _refuse_what_cannot_be_captured(optimizer, params, inputs, targets, loss_fn)
        self.inputs = inputs.detach().clone()
        self.targets = targets.detach().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # lazy initialisation on the side stream, then undone
                optimizer._run_batch(self.inputs, self.targets, loss_fn, keep=False)
        torch.cuda.current_stream().wait_stream(side)
        state = {p: dict(optimizer.state[p]) for p in params if p in optimizer.state}
        layout = _state_layout(optimizer, params)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.loss = optimizer._run_batch(self.inputs, self.targets, loss_fn, capturing=True).losses[0]
        except RuntimeError as error:
            raise RuntimeError("capturing the step failed: the model or loss reads a value on the host, or its "
                               f"shapes depend on the data ({str(error).splitlines()[0]})") from error
        if _state_layout(optimizer, params) != layout:  # each replay would create it afresh: put it back, refuse
            for p in params:
                if p in state:
                    optimizer.state[p] = state[p]
                else:
                    optimizer.state.pop(p, None)
            raise ValueError("cannot capture this Backforward step as a CUDA graph: the base optimizer created or "
                             "replaced its state inside the capture, which every replay would do again (take one "
                             "eager step first; the state must be tensors it changes in place, as Adam's with "
                             "capturable=True)")

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        for name, given, static in (("inputs", inputs, self.inputs), ("targets", targets, self.targets)):
            if given.shape != static.shape or given.dtype != static.dtype or given.device != static.device:
                raise ValueError(f"the step was captured for {name} of shape {tuple(static.shape)}, {static.dtype} "
                                 f"on {static.device}; got {tuple(given.shape)}, {given.dtype} on {given.device}: "
                                 "capture again for other shapes")
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.graph.replay()
        return self.loss


def _refuse_what_cannot_be_captured(optimizer: Backforward, params: list[torch.Tensor], inputs: torch.Tensor,
                                    targets: torch.Tensor, loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
    reasons = []
    if not all(p.is_cuda for p in params) or not inputs.is_cuda:
        reasons.append("the model and inputs must be on a CUDA device")
    elif optimizer._plan is None or not optimizer._plan.ordered:
        reasons.append("take one eager step first (it reads the stage order and creates the base optimizer's "
                       "state)")
    if optimizer.track_ics:
        reasons.append("the ICS meter reads its report on the host")
    if optimizer._scaler() is not None:
        reasons.append("a GradScaler decides on the host whether to skip a step")
    if optimizer._reducer() is not None:
        reasons.append("several processes: the per-pass all-reduce is not captured here")
    if not reasons and _draws_random_numbers(optimizer, inputs, targets, loss_fn):
        reasons.append("the forward draws random numbers (dropout); later passes must replay the first pass's "
                       "masks, which a captured graph cannot")
    if not reasons and optimizer._group_state_changes(inputs, targets, loss_fn):
        reasons.append("the base optimizer keeps group-level state, which a replay would not advance")
    if reasons:
        raise ValueError("cannot capture this Backforward step as a CUDA graph: " + "; ".join(reasons))


def _state_layout(optimizer: Backforward, params: list[torch.Tensor]) -> list[tuple[int, str, int]]:
    """Which state values each parameter has (by identity): a captured step must change them in place only."""
    return [(i, key, id(value)) for i, p in enumerate(params) for key, value in optimizer.state.get(p, {}).items()]


def _draws_random_numbers(optimizer: Backforward, inputs: torch.Tensor, targets: torch.Tensor,
                          loss_fn: Callable[[Any, Any], torch.Tensor]) -> bool:
    """Run the forward once and see whether a generator moved; puts back the generators and buffers."""
    start = rng_snapshot()
    buffers = BufferValues(list(optimizer.model.modules()))
    try:
        with torch.no_grad():
            loss_fn(optimizer.model(inputs), targets)
        after = rng_snapshot()
    finally:
        buffers.put_back()
        rng_restore(start)
    moved = not torch.equal(start[0], after[0])
    if start[1] is not None and after[1] is not None:
        moved = moved or any(not torch.equal(a, b) for a, b in zip(start[1], after[1], strict=True))
    return moved
