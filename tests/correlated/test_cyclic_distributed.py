"""``cyclic_poisson`` across real (gloo) ranks: one global cyclic sample, rank 0's stream."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dpcore
from dpcore.rng import make_generator

TESTS = Path(__file__).resolve().parents[1]
for folder in (TESTS / "distributed", Path(__file__).resolve().parent):
    if str(folder) not in sys.path:  # spawned ranks import workers by module name
        sys.path.insert(0, str(folder))

from cyclic_dist_workers import cyclic_shards  # noqa: E402
from dist_harness import run_ranks  # noqa: E402


@pytest.mark.slow
def test_ranks_draw_one_global_cyclic_sample_from_rank_zeros_stream() -> None:
    n, q, k, world = 97, 0.06, 3, 2
    ranks = run_ranks(cyclic_shards, world, n, q, k)
    single = dpcore.get_registry().create(
        "sampler",
        "cyclic_poisson",
        {"cycle_length": k},
        num_samples=n,
        sample_rate=q,
        generator=make_generator(7, "sampler", 0),
    )
    reference = list(single) + list(single)
    group_of = single.group_of()
    for t, batch in enumerate(reference):
        parts = [r["batches"][t] for r in ranks]
        assert all(i % world == rank for rank, part in enumerate(parts) for i in part)
        assert sorted(i for part in parts for i in part) == sorted(batch)
        assert all(int(group_of[i]) == t % k for i in batch)
    assert torch.equal(ranks[0]["state"]["generator"], ranks[1]["state"]["generator"])
