"""Canary injection: the wrapper's arithmetic, the sampler's rule, every built-in plugin."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import dpcore
from dpcore.audit.canaries import Canaries, CanaryAudit, CanaryGradSampler, CanarySampler
from dpcore.audit.run import run_audit
from dpcore.errors import PrivacyEngineError


class StubGradSampler:
    """Two real samples with fixed per-sample gradients, on parameters a (2x2) and b (3)."""

    def __init__(self) -> None:
        self.params = {"a": nn.Parameter(torch.zeros(2, 2)), "b": nn.Parameter(torch.zeros(3))}
        self.grads = {"a": torch.ones(2, 2, 2), "b": torch.full((2, 3), 2.0)}
        self.pending = False
        self.cleared = 0

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return self.params

    def has_pending(self) -> bool:
        return self.pending

    def per_sample_sq_norms(self) -> dict[str, Tensor]:
        return {n: g.flatten(1).pow(2).sum(1) for n, g in self.grads.items()}

    def clipped_sums(self, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.pending = False
        return {n: torch.einsum("i,i...->...", factors[n], g) for n, g in self.grads.items()}

    def clear(self) -> None:
        self.pending = False
        self.cleared += 1


class HalvingClipper:
    def sensitivity(self) -> float:
        return 1.0


def test_canary_rows_and_contributions_go_to_their_coordinates() -> None:
    inner = StubGradSampler()
    canaries = Canaries([("a", 3), ("b", 1), ("b", 2)], np.array([True, True, False]), seed=0)
    canaries.magnitude = 10.0
    gs = CanaryGradSampler(inner, canaries, HalvingClipper())
    inner.pending = True
    gs.queue([0, 1])
    gs.clear()  # zero_grad between drawing the batch and the backward pass keeps the canaries
    inner.pending = True
    assert gs.has_pending()
    sq = gs.per_sample_sq_norms()
    assert sq["a"].tolist() == [4.0, 4.0, 100.0, 0.0]
    assert sq["b"].tolist() == [12.0, 12.0, 0.0, 100.0]
    factors = {"a": torch.tensor([1.0, 0.5, 0.1, 0.1]), "b": torch.tensor([1.0, 0.5, 0.1, 0.2])}
    sums = gs.clipped_sums(factors)
    expected_a = torch.full((2, 2), 1.5)
    expected_a.view(-1)[3] += 1.0  # canary 0: factor 0.1 x magnitude 10
    expected_b = torch.full((3,), 3.0)
    expected_b[1] += 2.0  # canary 1: factor 0.2 x 10
    assert torch.allclose(sums["a"], expected_a) and torch.allclose(sums["b"], expected_b)
    assert canaries.draws.tolist() == [1, 1, 0]
    assert gs.take_step_contributions() == pytest.approx([1.0, 2.0])
    assert canaries.max_contribution == pytest.approx(2.0)
    assert not gs.has_pending()


def test_canaries_alone_when_the_data_batch_is_empty() -> None:
    inner = StubGradSampler()
    canaries = Canaries([("a", 0), ("b", 0)], np.array([True, True]), seed=0)
    canaries.magnitude = 5.0
    gs = CanaryGradSampler(inner, canaries, HalvingClipper())
    gs.queue([1])
    assert gs.has_pending()
    sq = gs.per_sample_sq_norms()
    assert sq["a"].tolist() == [0.0] and sq["b"].tolist() == [25.0]
    sums = gs.clipped_sums({"a": torch.tensor([1.0]), "b": torch.tensor([0.2])})
    assert set(sums) == {"b"} and sums["b"].tolist() == [1.0, 0.0, 0.0]


def test_placement_is_seeded_distinct_and_bounded() -> None:
    params = {"w": nn.Parameter(torch.zeros(10, 10)), "v": nn.Parameter(torch.zeros(5))}
    one = Canaries.place(params, 60, seed=3)
    again = Canaries.place(params, 60, seed=3)
    other = Canaries.place(params, 60, seed=4)
    assert one.coordinates == again.coordinates and one.coordinates != other.coordinates
    assert len(set(one.coordinates)) == 60
    assert all(0 <= i < params[n].numel() for n, i in one.coordinates)
    assert 15 < one.included.sum() < 45
    with pytest.raises(PrivacyEngineError, match="at most 105"):
        Canaries.place(params, 106, seed=0)


def test_canary_sampler_splits_data_and_canaries() -> None:
    class Fixed:
        sample_rate, min_separation, dp_exact = 0.5, 1, True

        def __iter__(self):
            yield from ([0, 3, 5], [], [4, 1])

        def __len__(self) -> int:
            return 3

    sampler = CanarySampler(Fixed(), num_data=3, in_ids=np.array([7, 9, 11]))
    assert list(sampler) == [[0], [], [1]]
    assert [sampler.pop_canaries() for _ in range(4)] == [[7, 11], [], [9], []]


def tiny_private_run(steps: int, physical: int | None, **config: object):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    cfg = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": 5, **config}
    engine = dpcore.PrivacyEngine.from_config(cfg)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader
    )
    audit = CanaryAudit(engine, canaries=40, seed=2).attach()
    loss_fn = nn.CrossEntropyLoss()
    taken = 0

    def train_step(xb: Tensor, yb: Tensor) -> None:
        optimizer.zero_grad()
        if len(xb):
            loss_fn(model(xb), yb).backward()
        optimizer.step()

    while taken < steps:
        if physical is None:
            for xb, yb in loader:
                train_step(xb, yb)
                taken += 1
                if taken == steps:
                    break
        else:
            with dpcore.BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer
            ) as physical_loader:
                for xb, yb in physical_loader:
                    train_step(xb, yb)
                    taken = engine.steps
            break
    return engine, optimizer, audit


@pytest.mark.parametrize("physical", [None, 3])
def test_training_run_with_canaries(physical: int | None) -> None:
    engine, optimizer, audit = tiny_private_run(24, physical)
    c = audit.canaries
    assert c is not None
    assert (c.draws[~c.included] == 0).all()  # an out-canary is never trained on
    assert c.draws[c.included].sum() > 0
    # each in-canary is drawn at the sampler's rate, once per drawn logical batch
    assert c.draws[c.included].mean() == pytest.approx(engine.sample_rate * engine.steps, rel=0.5)
    assert len(c.noise_stds) == engine.steps
    report = audit.report()
    assert report.claimed_epsilon == pytest.approx(engine.get_epsilon(1e-5))
    assert report.steps == engine.steps
    assert math.isfinite(report.mu_hat)
    wrapped = optimizer.grad_sampler
    audit.detach()
    assert optimizer.grad_sampler is wrapped.inner
    assert engine.data_loader.dp_sampler is engine.sampler


BASE = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "seed": 1}


def _passes(**components: object) -> None:
    report = run_audit({**BASE, **components}, canaries=400, steps=30)
    assert report.verdict == "pass", report.reasons
    assert report.max_contribution > 0


@pytest.mark.parametrize("name", ["hooks", "functorch", "ew", "ghost", "bk"])
def test_every_grad_sampler(name: str) -> None:
    _passes(grad_sampler={"name": name})


@pytest.mark.parametrize("name", ["flat", "per_layer", "automatic", "adaptive"])
def test_every_clipper(name: str) -> None:
    _passes(clipper={"name": name})


def test_per_layer_bounds_given_as_a_list() -> None:
    _passes(clipper={"name": "per_layer"}, max_grad_norm=[0.5, 1.0, 2.0])


@pytest.mark.filterwarnings("ignore:sampler 'shuffle'")
@pytest.mark.parametrize("name", ["poisson", "distributed_poisson", "shuffle"])
def test_every_sampler(name: str) -> None:
    _passes(sampler={"name": name})


def test_correlated_noise_is_scored_decorrelated() -> None:
    # bandmf's noise is correlated across steps; scores use the stream multiplied back by C,
    # whose noise is independent again, so mu_hat matches the plain formula
    report = run_audit(
        {**BASE, "noise": {"name": "bandmf", "bands": 4}, "sampler": {"name": "cyclic_poisson"}},
        canaries=2000, steps=40, sample_rate=0.05,
    )  # fmt: skip
    assert report.verdict == "pass", report.reasons
    assert report.mu_expected > 0.3
