"""Worker functions for the spawned gloo processes of ``test_cyclic_distributed``."""

from __future__ import annotations

from typing import Any


def cyclic_shards(rank: int, world_size: int, n: int, q: float, k: int) -> dict[str, Any]:
    """Build the sampler as the engine would: a different generator per rank."""
    import dpcore
    from dpcore.rng import make_generator

    sampler = dpcore.get_registry().create(
        "sampler",
        "cyclic_poisson",
        {"cycle_length": k},
        num_samples=n,
        sample_rate=q,
        generator=make_generator(7, "sampler", rank),
        rank=rank,
        world_size=world_size,
    )
    batches = list(sampler) + list(sampler)
    return {"batches": batches, "state": sampler.state_dict()}
