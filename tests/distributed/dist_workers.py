"""Functions that run on every rank of a spawned gloo group (see ``dist_harness``).

Each takes ``(rank, world_size, *args)`` and returns plain data for the test to check.
They live in an importable module because spawned processes import them by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import dpcore
from dpcore import distributed as D
from dpcore.errors import DistributedError


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def wrapper_basics(rank: int, world_size: int) -> dict[str, Any]:
    """DPDDP syncs at construction, then leaves forward/backward alone."""
    model = tiny_model(seed=100 + rank)  # deliberately different per rank
    model.register_buffer("counter", torch.tensor([float(rank)]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = dpcore.DPDDP(model)
    after = {k: v.clone() for k, v in wrapped.state_dict().items()}
    x = torch.full((5, 4), float(rank + 1))
    wrapped(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in wrapped.named_parameters()}
    return {
        "before": before,
        "after": after,
        "grads": grads,
        "rank": D.rank(),
        "world_size": D.world_size(),
        "is_distributed": D.is_distributed(),
    }


def config_check(rank: int, world_size: int, differ: bool) -> str:
    config = {"noise_multiplier": 1.0, "sampler": {"name": "distributed_poisson"}, "seed": 3}
    if differ and rank == 1:
        config = {**config, "noise_multiplier": 0.5}
    try:
        D.check_same_config(config)
    except DistributedError as exc:
        return str(exc)
    return "ok"


def all_reduce_and_broadcast(rank: int, world_size: int) -> dict[str, Any]:
    tensors = {
        "a": torch.full((2, 3), float(rank + 1)),
        "b": torch.arange(4, dtype=torch.float64) * (rank + 1),
        "c": torch.tensor([rank + 1], dtype=torch.int64),
    }
    D.all_reduce_sum_(tensors)
    seed = D.broadcast_object(1000 + rank)
    return {"tensors": tensors, "seed": seed}


def plain_ddp_refused(rank: int, world_size: int) -> str:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(tiny_model(0))
    try:
        dpcore.DPDDP(ddp)
    except DistributedError as exc:
        return str(exc)
    return "accepted"


def sampler_shards(rank: int, world_size: int, n: int, q: float, steps: int) -> dict[str, Any]:
    """Build the sampler as the engine would, with a different generator per rank."""
    from dpcore.rng import make_generator

    sampler = dpcore.get_registry().create(
        "sampler",
        "distributed_poisson",
        {"steps_per_epoch": steps},
        num_samples=n,
        sample_rate=q,
        generator=make_generator(7, "sampler", rank),
        rank=rank,
        world_size=world_size,
    )
    return {"batches": list(sampler), "state": sampler.state_dict()}
