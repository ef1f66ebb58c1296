"""The ``cyclic_poisson`` sampler: groups, rates, sharding, state."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from dpcore.errors import CheckpointError, ConfigError
from dpcore.registry import get_registry
from dpcore.rng import make_generator


def cyclic(num_samples=300, sample_rate=0.02, seed=0, rank=0, world_size=1, **options):
    return get_registry().create(
        "sampler",
        "cyclic_poisson",
        options,
        num_samples=num_samples,
        sample_rate=sample_rate,
        generator=make_generator(seed, "sampler", 0),
        rank=rank,
        world_size=world_size,
    )


def run(sampler, epochs: int) -> list[list[int]]:
    return [batch for _ in range(epochs) for batch in sampler]


def test_each_index_only_at_steps_congruent_to_its_group_at_the_right_rate() -> None:
    n, q, k = 300, 0.02, 4
    sampler = cyclic(n, q, cycle_length=k)
    assert sampler.min_separation == k and sampler.sample_rate == pytest.approx(q * k)
    assert sampler.expected_batch_size == pytest.approx(q * n)
    group_of = sampler.group_of()
    assert np.bincount(group_of.numpy()).tolist() == [75] * 4  # balanced partition
    batches = run(sampler, 40)  # 40 epochs x 50 steps
    steps = len(batches)
    counts = np.zeros(n)
    for t, batch in enumerate(batches):
        assert len(set(batch)) == len(batch)
        assert all(int(group_of[i]) == t % k for i in batch)
        counts[batch] += 1
    # each index had steps/k chances at rate p = q k: binomial counts, checked in aggregate
    chances, p = steps // k, q * k
    assert stats.binomtest(int(counts.sum()), chances * n, p).pvalue > 1e-4
    # and per index: counts spread like Binomial(chances, p) (no index favoured or starved)
    assert np.var(counts) == pytest.approx(chances * p * (1 - p), rel=0.3)


def test_participations_are_at_least_a_cycle_apart() -> None:
    k = 5
    last: dict[int, int] = {}
    for t, batch in enumerate(run(cyclic(120, 0.04, cycle_length=k), 10)):
        for i in batch:
            assert t - last.get(i, -k) >= k and (t - last.get(i, t - k)) % k == 0
            last[i] = t


def test_ranks_shard_one_global_sample() -> None:
    single = run(cyclic(203, 0.03, seed=4, cycle_length=3), 2)
    shards = [
        run(cyclic(203, 0.03, seed=4, rank=r, world_size=3, cycle_length=3), 2) for r in range(3)
    ]
    for t, batch in enumerate(single):
        parts = [shard[t] for shard in shards]
        assert all(i % 3 == r for r, part in enumerate(parts) for i in part)
        assert sorted(itertools.chain(*parts)) == sorted(batch)


def test_cycle_length_defaults_to_the_noise_separation_and_to_one_alone() -> None:
    alone = cyclic(100, 0.05)
    assert alone.cycle_length == 1 and alone.sample_rate == pytest.approx(0.05)
    alone.require_separation(4)
    assert alone.cycle_length == 4 and alone.min_separation == 4
    assert alone.sample_rate == pytest.approx(0.2)
    explicit = cyclic(100, 0.05, cycle_length=2)
    explicit.require_separation(4)  # left alone: the engine refuses 2 < 4 with the fix
    assert explicit.cycle_length == 2


def test_rate_above_one_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="fewer bands"):
        cyclic(100, 0.3, cycle_length=4)
    with pytest.raises(ConfigError, match="fewer bands"):
        cyclic(100, 0.3).require_separation(4)


def test_resume_mid_epoch_is_exact() -> None:
    full = run(cyclic(150, 0.05, seed=9, cycle_length=3), 3)
    sampler = cyclic(150, 0.05, seed=9, cycle_length=3)
    head = []
    it = iter(sampler)
    for _ in range(13):
        head.append(next(it))
    buf = io.BytesIO()
    torch.save(sampler.state_dict(), buf)
    buf.seek(0)
    resumed = cyclic(150, 0.05, seed=123, cycle_length=3)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    tail = list(resumed) + run(resumed, 2)
    assert head + tail == full
    with pytest.raises(CheckpointError, match="cycle_length"):
        cyclic(150, 0.05, cycle_length=4).load_state_dict(sampler.state_dict())
    with pytest.raises(CheckpointError, match="partition_seed"):
        cyclic(150, 0.05, cycle_length=3, partition_seed=1).load_state_dict(sampler.state_dict())


def test_epoch_length_matches_poisson() -> None:
    assert len(cyclic(1000, 0.01, cycle_length=8)) == 100
    assert [len(b) for b in cyclic(10, 1 / 3, cycle_length=3)] != []


def test_state_is_epoch_start_plus_position_like_a_snapshotting_loader_writes() -> None:
    full = run(cyclic(150, 0.05, seed=9, cycle_length=3), 2)
    sampler = cyclic(150, 0.05, seed=9, cycle_length=3)
    first_epoch = list(sampler)
    snapshot = dict(sampler.state_dict())  # start of epoch 2, as a loader would take it
    it = iter(sampler)
    delivered = [next(it) for _ in range(7)]
    snapshot["position"] = 7  # what the loader adds: batches delivered this epoch
    assert snapshot["position"] == sampler.state_dict()["position"]
    assert torch.equal(snapshot["generator"], sampler.state_dict()["generator"])
    resumed = cyclic(150, 0.05, seed=1, cycle_length=3)
    resumed.load_state_dict(snapshot)
    assert first_epoch + delivered + list(resumed) == full


def test_resume_with_another_world_size_reshards_the_same_global_batches() -> None:
    single = cyclic(90, 0.05, seed=2, cycle_length=3)
    it = iter(single)
    for _ in range(8):
        next(it)
    two = cyclic(90, 0.05, seed=2, world_size=2, cycle_length=3)
    it2 = iter(two)
    for _ in range(8):
        next(it2)
    state = two.state_dict()  # rank 0's checkpoint, written with two ranks
    rest = list(single) + list(single)
    shards = []
    for rank in range(3):
        s = cyclic(90, 0.05, seed=rank, rank=rank, world_size=3, cycle_length=3)
        s.load_state_dict(state)
        shards.append(list(s) + list(s))
    for t, batch in enumerate(rest):
        assert sorted(i for shard in shards for i in shard[t]) == sorted(batch)
