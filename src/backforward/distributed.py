"""Data-parallel Backforward on ``torch.distributed``: one flattened all-reduce per pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def grad_averager(group: Any = None) -> Callable[[list[torch.Tensor]], None] | None:
    """A function averaging gradients in place over ``group``, or None when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)
    if world == 1:
        return None

    def average(grads: list[torch.Tensor]) -> None:
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    return average


def debug_mode() -> bool:
    """TORCH_DISTRIBUTED_DEBUG is INFO or DETAIL."""
    return dist.is_available() and dist.is_initialized() and dist.get_debug_level() != dist.DebugLevel.OFF


def check_replicas(params: list[torch.Tensor], group: Any = None) -> None:
    """Raise if the parameters differ between processes (two float64 checksums, one small all-reduce)."""
    if grad_averager(group) is None:
        return
    with torch.no_grad():
        local = torch.stack([sum(p.detach().double().sum() for p in params),
                             sum((p.detach().double() ** 2).sum() for p in params)]).cpu()
    extremes = torch.cat([local, -local])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)  # max, and -min, of each checksum
    if not torch.equal(extremes[:2], -extremes[2:]):
        raise RuntimeError(f"parameters differ across processes after the step (rank {dist.get_rank()}: "
                           f"checksums {local.tolist()}, range over ranks {(-extremes[2:]).tolist()} .. "
                           f"{extremes[:2].tolist()})")
