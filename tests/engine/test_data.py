"""Poisson sampling statistics, empty batches, data loader state, physical batches."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import dpcore
from dpcore.data import DPDataLoader
from dpcore.errors import PrivacyEngineError
from dpcore.registry import get_registry


def poisson(n=200, q=0.1, seed=0, rank=0, world_size=1, **options):
    return get_registry().create(
        "sampler",
        "poisson",
        options,
        num_samples=n,
        sample_rate=q,
        generator=torch.Generator().manual_seed(seed),
        rank=rank,
        world_size=world_size,
    )


def _batches(sampler, epochs):
    return [b for _ in range(epochs) for b in sampler]


def test_poisson_inclusion_rate_and_batch_size_distribution():
    n, q = 200, 0.1
    sampler = poisson(n, q)
    assert len(sampler) == 10 and sampler.dp_exact and sampler.min_separation == 1
    batches = _batches(sampler, 200)  # 2,000 batches
    t = len(batches)
    counts = np.zeros(n)
    for b in batches:
        assert len(set(b)) == len(b)
        counts[b] += 1
    # total inclusions ~ Binomial(N·T, q)
    assert stats.binomtest(int(counts.sum()), n * t, q).pvalue > 1e-3
    # every example's inclusions ~ Binomial(T, q) (Bonferroni over the N examples)
    pvalues = [stats.binomtest(int(c), t, q).pvalue for c in counts]
    assert min(pvalues) > 1e-3 / n
    # batch sizes ~ Binomial(N, q): chi-square over bins with enough expected mass
    sizes = np.array([len(b) for b in batches])
    edges = [0, 14, 16, 18, 20, 22, 24, 26, n + 1]
    observed = np.histogram(sizes, bins=edges)[0]
    cdf = stats.binom.cdf(np.array(edges) - 1, n, q)
    expected = np.diff(cdf) * t
    assert expected.min() > 5
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3
    # consecutive batches are independent: their sizes are uncorrelated
    assert abs(stats.pearsonr(sizes[:-1], sizes[1:]).statistic) < 4 / np.sqrt(t)


def test_poisson_test_rejects_a_wrong_rate():
    sampler = poisson(200, 0.11)
    total = sum(len(b) for b in _batches(sampler, 100))
    assert stats.binomtest(total, 200 * len(sampler) * 100, 0.1).pvalue < 1e-3


def test_poisson_shards_union_is_a_poisson_sample_of_the_whole_data_set():
    n, q, w = 101, 0.2, 3
    shards = [poisson(n, q, seed=10 + r, rank=r, world_size=w) for r in range(w)]
    steps = 0
    counts = np.zeros(n)
    for _ in range(100):
        for per_rank in zip(*shards, strict=True):
            for r, b in enumerate(per_rank):
                assert all(i % w == r for i in b)
                counts[b] += 1
            steps += 1
    assert stats.binomtest(int(counts.sum()), n * steps, q).pvalue > 1e-3
    assert min(stats.binomtest(int(c), steps, q).pvalue for c in counts) > 1e-3 / n


def test_shuffle_sampler_covers_each_example_once_per_epoch():
    sampler = get_registry().create(
        "sampler",
        "shuffle",
        num_samples=23,
        sample_rate=0.25,
        generator=torch.Generator().manual_seed(0),
    )
    assert not sampler.dp_exact
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4
    assert sorted(i for b in batches for i in b) == list(range(23))
    assert [len(b) for b in batches] == [6, 6, 6, 5]


@pytest.mark.parametrize("name", ["poisson", "shuffle"])
def test_sampler_resumes_mid_epoch_exactly(name):
    def make():
        return get_registry().create(
            "sampler",
            name,
            num_samples=50,
            sample_rate=0.1,
            generator=torch.Generator().manual_seed(4),
        )

    straight = make()
    expected = _batches(straight, 3)
    first = make()
    it = iter(first)
    seen = [next(it) for _ in range(13 % len(first))]
    state = first.state_dict()
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    rest = list(resumed) + _batches(resumed, 2)
    assert seen + rest == expected


# ------------------------------------------------------------------------------------
# Empty batches
# ------------------------------------------------------------------------------------
Pair = namedtuple("Pair", "image label")


class Structured(Dataset):
    def __init__(self, kind):
        self.kind = kind

    def __len__(self):
        return 10

    def __getitem__(self, i):
        x = torch.full((3, 2), float(i))
        if self.kind == "tensor":
            return x
        if self.kind == "tuple":
            return x, i
        if self.kind == "dict":
            return {"x": x, "y": torch.tensor(i)}
        if self.kind == "namedtuple":
            return Pair(x, i)
        return {"inputs": (x, {"mask": torch.ones(4, dtype=torch.bool)}), "label": i}


class EveryOtherEmpty:
    """A sampler plugin whose batches alternate between empty and two examples."""

    sample_rate = 0.2
    min_separation = 1
    dp_exact = True

    def __iter__(self):
        for i in range(4):
            yield [] if i % 2 == 0 else [i, i + 1]

    def __len__(self):
        return 4

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _shapes(batch):
    if isinstance(batch, torch.Tensor):
        return (tuple(batch.shape[1:]), batch.dtype)
    if isinstance(batch, dict):
        return {k: _shapes(v) for k, v in batch.items()}
    return type(batch).__name__, [_shapes(v) for v in batch]


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "namedtuple", "nested"])
def test_empty_batches_keep_the_structure_and_shapes(kind):
    dl = DPDataLoader.from_data_loader(
        DataLoader(Structured(kind), batch_size=2), sampler=EveryOtherEmpty()
    )
    empty, full, *_ = list(dl)
    assert _shapes(empty) == _shapes(full)
    leaves = [empty] if isinstance(empty, torch.Tensor) else list(_leaves(empty))
    assert leaves and all(t.shape[0] == 0 for t in leaves)
    if kind == "namedtuple":
        assert isinstance(empty, Pair)


def _leaves(batch):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _leaves(v)
    else:
        for v in batch:
            yield from _leaves(v)


def test_iterable_dataset_is_refused_with_a_clear_message():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(5)

    with pytest.raises(PrivacyEngineError, match="not map-style"):
        DPDataLoader.from_data_loader(DataLoader(Stream(), batch_size=2))


def test_data_loader_state_counts_delivered_batches():
    ds = TensorDataset(torch.arange(40.0))
    dl = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=4), seed=3)
    assert len(dl) == 10 and dl.sample_rate == pytest.approx(0.1)
    straight = [b[0].tolist() for b in dl] + [b[0].tolist() for b in dl]

    dl1 = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=4), seed=3)
    it = iter(dl1)
    head = [next(it)[0].tolist() for _ in range(4)]
    state = dl1.state_dict()
    assert state["position"] == 4 and state["epoch"] == 0
    dl2 = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=4), seed=999)
    dl2.load_state_dict(state)
    tail = [b[0].tolist() for b in dl2] + [b[0].tolist() for b in dl2]
    assert head + tail == straight


def test_batch_memory_manager_takes_one_real_step_per_logical_batch():
    ds = TensorDataset(torch.randn(60, 3), torch.randint(0, 2, (60,)))
    model = torch.nn.Linear(3, 2)
    engine = dpcore.PrivacyEngine(accountant="rdp")
    engine.accountant = _CountingAccountant()
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=20),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=0,
    )
    logical = [len(b) for b in _replay(dl)]
    physical = []
    with dpcore.BatchMemoryManager(data_loader=dl, max_physical_batch_size=4, optimizer=opt) as pl:
        for x, y in pl:
            physical.append(len(x))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert max(physical) <= 4 and sum(physical) == sum(logical)
    assert engine.steps == len(logical) == 3
    assert engine.accountant.steps == 3


class _CountingAccountant:
    def __init__(self):
        self.steps = 0
        self.history = []

    def step(self, *, noise_multiplier, sample_rate, steps=1):
        self.steps += steps

    def state_dict(self):
        return {}


def _replay(dl):
    """A copy of the loader's sampler (same state), to know the logical batches in advance."""
    smp = get_registry().create(
        "sampler", "poisson", num_samples=60, sample_rate=1 / 3, generator=torch.Generator()
    )
    smp.load_state_dict(dl.dp_sampler.state_dict())
    return smp


def test_prefetching_workers_keep_state_and_virtual_steps_aligned():
    """With workers the sampler runs ahead of the training loop; the loader's state and
    BatchMemoryManager's step signals follow what was delivered, not what was fetched."""
    ds = TensorDataset(torch.arange(60.0).unsqueeze(1), torch.zeros(60, dtype=torch.long))
    base = DataLoader(ds, batch_size=15, num_workers=1, prefetch_factor=4)
    straight = [b[0].flatten().tolist() for b in DPDataLoader.from_data_loader(base, seed=2)]

    dl = DPDataLoader.from_data_loader(base, seed=2)
    it = iter(dl)
    first = next(it)[0].flatten().tolist()
    state = dl.state_dict()
    assert state["position"] == 1  # although the worker has prefetched more
    del it
    resumed = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=15), seed=99)
    resumed.load_state_dict(state)
    assert [first] + [b[0].flatten().tolist() for b in resumed] == straight

    class Recorder:
        def __init__(self):
            self.skips = []

        def signal_skip_step(self, do_skip=True):
            self.skips.append(do_skip)

    rec = Recorder()
    dl = DPDataLoader.from_data_loader(base, seed=2)
    chunks = []
    with dpcore.BatchMemoryManager(data_loader=dl, max_physical_batch_size=4, optimizer=rec) as pl:
        for x, _ in pl:
            chunks.append(x.flatten().tolist())
    expected_skips = []
    for batch in straight:
        n = max(1, -(-len(batch) // 4))
        expected_skips += [True] * (n - 1) + [False]
    assert rec.skips[: len(expected_skips)] == expected_skips
    assert [i for c in chunks for i in c] == [i for b in straight for i in b]
