"""The separately installed `dpcore-pld` plugin (skipped when dp-accounting is absent)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("dp_accounting")
pytest.importorskip("dpcore_pld")

from accounting._reference import gaussian_epsilon
from dpcore.accounting import compute_epsilon, create_accountant, get_noise_multiplier
from dpcore.registry import get_registry


def test_discovered_through_its_entry_point(fresh_registry):
    info = get_registry().get("accountant", "pld")
    assert info.provider == "dpcore-pld" and info.status == "ok"


def test_full_batch_matches_the_exact_gaussian():
    got = compute_epsilon(
        noise_multiplier=2.0, sample_rate=1.0, steps=16, delta=1e-5, accountant="pld"
    )
    assert got == pytest.approx(gaussian_epsilon(2.0, 1e-5), abs=2e-3)


@pytest.mark.parametrize("sigma, q, steps", [(1.1, 256 / 60000, 14100), (0.8, 0.05, 300)])
def test_two_independent_pld_implementations_agree(sigma, q, steps):
    prv = create_accountant("prv")
    prv.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    bounds = prv.get_epsilon_bounds(1e-5)
    pld = compute_epsilon(
        noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant="pld"
    )
    assert bounds.lower <= pld <= bounds.upper + 1e-3


def test_state_round_trip_and_calibration():
    acc = create_accountant("pld", value_discretization_interval=1e-3)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    other = create_accountant("pld", value_discretization_interval=1e-3)
    other.load_state_dict(acc.state_dict())
    assert other.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    sigma = get_noise_multiplier(
        target_epsilon=2.0,
        target_delta=1e-5,
        sample_rate=0.01,
        steps=300,
        accountant="pld",
        value_discretization_interval=1e-3,
    )
    spent = compute_epsilon(
        noise_multiplier=sigma,
        sample_rate=0.01,
        steps=300,
        delta=1e-5,
        accountant="pld",
        value_discretization_interval=1e-3,
    )
    assert 1.99 <= spent <= 2.0 and math.isfinite(sigma)
