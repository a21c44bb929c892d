"""Functions run in spawned processes by test_distributed.py (importable by name, as spawn needs)."""

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from backforward import Backforward
from backforward.experiments.launch import exit_without_shutdown

F = nn.functional
COMBOS = [(engine, base) for engine in ("step", "step_batch") for base in ("sgd", "adam")]


def problem():
    """A model, its full batch (16 samples), identical in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def make_base(name, params):
    return torch.optim.SGD(params, lr=0.2) if name == "sgd" else torch.optim.Adam(params, lr=0.01)


def train_steps(engine, base, rank=0, world=1, steps=3):
    """Backforward steps on this process's shard of the full batch; final parameters and losses."""
    model, x, y = problem()
    xs, ys = x[rank::world], y[rank::world]
    bf = Backforward(model, make_base(base, model.parameters()), check_replicas=world > 1)
    losses = []
    for _ in range(steps):
        if engine == "step":
            def closure():
                loss = F.cross_entropy(model(xs), ys)
                loss.backward()
                return loss
            bf.step(closure)
        else:
            bf.step_batch(xs, ys, F.cross_entropy)
        losses.append(bf.last_losses)
    return [p.detach().clone() for p in model.parameters()], losses


def init(rank, world, store):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))


def equality_worker(rank, world, store, out):
    init(rank, world, store)
    results = {combo: train_steps(*combo, rank=rank, world=world) for combo in COMBOS}
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()
    exit_without_shutdown(0)


def failing_worker(rank, world, store, out):
    """Rank 1 dies after one step; rank 0 must fail fast with an error, not hang."""
    init(rank, world, store)
    model, x, y = problem()
    bf = Backforward(model, torch.optim.SGD(model.parameters(), lr=0.1))
    bf.step_batch(x[rank::world], y[rank::world], F.cross_entropy)
    if rank == 1:
        os._exit(17)
    start = time.time()
    try:
        for _ in range(5):
            bf.step_batch(x[rank::world], y[rank::world], F.cross_entropy)
        message = "no error"
    except RuntimeError as e:
        message = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    with open(out, "w") as f:
        f.write(f"{time.time() - start:.1f}\n{message}\n")


def replica_worker(rank, world, store, out):
    """The replica check passes on equal parameters and raises on every rank once one differs."""
    from backforward.distributed import check_replicas

    init(rank, world, store)
    model, _, _ = problem()
    params = list(model.parameters())
    check_replicas(params)
    if rank == 1:
        with torch.no_grad():
            params[0][0, 0] += 1e-3
    try:
        check_replicas(params)
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    with open(f"{out}.{rank}", "w") as f:
        f.write(message)
    dist.destroy_process_group()
    exit_without_shutdown(0)
