"""The ``distributed_poisson`` sampler: shards, inclusion rate, state, re-sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import dpcore
from dpcore.errors import ConfigError


def make(n, q, rank=0, world_size=1, seed=0, steps=None):
    options = {} if steps is None else {"steps_per_epoch": steps}
    return dpcore.get_registry().create(
        "sampler",
        "distributed_poisson",
        options,
        num_samples=n,
        sample_rate=q,
        generator=torch.Generator().manual_seed(seed),
        rank=rank,
        world_size=world_size,
    )


def union(batches_per_rank):
    return [
        sorted(i for batch in step for i in batch) for step in zip(*batches_per_rank, strict=True)
    ]


def test_protocol_attributes_and_length():
    s = make(1000, 0.01)
    assert (s.sample_rate, s.min_separation, s.dp_exact, len(s)) == (0.01, 1, True, 100)
    assert s.expected_batch_size == pytest.approx(10.0)
    assert len(make(1000, 0.01, steps=7)) == 7
    with pytest.raises(ConfigError):
        make(1000, 0.0)


def test_shards_partition_one_poisson_sample():
    n, q, steps = 101, 0.2, 30
    reference = list(make(n, q, seed=5, steps=steps))  # one rank: an ordinary Poisson sampler
    for world in (2, 3):
        per_rank = [list(make(n, q, r, world, seed=5, steps=steps)) for r in range(world)]
        for r, batches in enumerate(per_rank):
            assert all(i % world == r for b in batches for i in b)  # rank r's shard only
        assert union(per_rank) == reference  # same global batches whatever the world size


def test_inclusion_rate_and_independence():
    """Each index is included with probability q independently of everything else."""
    n, q, steps, world = 240, 0.05, 3000, 2
    # the engine gives each rank its own generator; inclusion must not depend on it
    per_rank = [list(make(n, q, r, world, seed=11 + r, steps=steps)) for r in range(world)]
    counts = np.zeros(n)
    sizes = np.zeros((world, steps))
    for r, batches in enumerate(per_rank):
        for t, b in enumerate(batches):
            counts[b] += 1
            sizes[r, t] = len(b)
    # per-example inclusion counts ~ Binomial(steps, q): chi-square over the examples
    expected = steps * q
    chi2 = ((counts - expected) ** 2 / (expected * (1 - q))).sum()
    assert stats.chi2.sf(chi2, df=n) > 1e-4 and stats.chi2.cdf(chi2, df=n) > 1e-4
    # total inclusions: binomial test at rate q
    assert stats.binomtest(int(counts.sum()), n * steps, q).pvalue > 1e-4
    # local batch size of a rank ~ Binomial(n / world, q): compare the distributions
    for r in range(world):
        ks = stats.kstest(sizes[r], stats.binom(n // world, q).cdf)
        assert abs(sizes[r].mean() - n // world * q) < 4 * np.sqrt(n // world * q * (1 - q) / steps)
        assert ks.statistic < 0.2  # discrete: KS p-values are not calibrated, bound the distance
    # ranks are independent: their batch sizes are uncorrelated
    assert abs(stats.pearsonr(sizes[0], sizes[1]).statistic) < 4 / np.sqrt(steps)
    # a wrong rate (e.g. q / world per rank) would be rejected by the same binomial test
    assert stats.binomtest(int(counts.sum()), n * steps, q / world).pvalue < 1e-6


def test_resume_from_rank0_state_with_other_world_size_gives_the_same_batches():
    n, q, steps = 64, 0.25, 12
    one = make(n, q, seed=3, steps=steps)
    straight = list(one) + list(one)  # two epochs on one rank
    # two ranks, interrupted mid-epoch; only rank 0's state is kept (it writes checkpoints)
    ranks = [make(n, q, r, 2, seed=3, steps=steps) for r in range(2)]
    iters = [iter(s) for s in ranks]
    first = [[next(it) for _ in range(5)] for it in iters]
    state = ranks[0].state_dict()
    assert (state["epoch"], state["position"]) == (0, 5)
    # resume on three ranks from rank 0's state alone
    resumed = [make(n, q, r, 3, seed=999, steps=steps) for r in range(3)]
    for s in resumed:
        s.load_state_dict(state)
    rest = [list(s) + list(s) for s in resumed]
    assert union(first) + union(rest) == straight
    assert resumed[0].epoch == 2


def test_state_is_plain_data_and_refuses_another_data_set(tmp_path):
    s = make(50, 0.1)
    next(iter(s))
    torch.save(s.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    other = make(50, 0.1, seed=1)
    other.load_state_dict(state)
    assert list(other) == list(s)
    with pytest.raises(ConfigError, match="num_samples"):
        make(60, 0.1).load_state_dict(state)
