"""The gdp accountant: exact at q = 1, the CLT formula, published values, its refusals."""

from __future__ import annotations

import math

import pytest

from accounting._reference import gaussian_epsilon
from dpcore.builtins.accountants.gdp import (
    GDPAccountant,
    GDPApproximationWarning,
    clt_mu,
    gaussian_dp_epsilon,
)
from dpcore.errors import AccountingError


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (0.7, 10), (3.0, 400)])
def test_full_batch_is_exact(sigma, steps):
    acc = GDPAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=1.0, steps=steps)
    expected = gaussian_epsilon(math.sqrt(steps) / sigma, 1e-5)
    assert acc.get_epsilon(1e-5) == pytest.approx(expected, abs=1e-8)


def test_published_clt_values():
    # Bu, Dong, Long & Su, "Deep learning with Gaussian differential privacy", Harvard Data
    # Science Review 2020, Fig. 4 caption (MNIST, p = 256/60000, delta = 1e-5):
    # sigma 1.06 for 20 epochs gives mu_CLT = 0.35 and (1.34, 1e-5)-DP;
    # sigma 0.638 for 70 epochs gives mu_CLT = 1.78 and (8.68, 1e-5)-DP.
    q = 256 / 60000
    assert clt_mu(1.06, q, round(20 / q)) == pytest.approx(0.35, abs=0.005)
    assert clt_mu(0.638, q, round(70 / q)) == pytest.approx(1.78, abs=0.005)
    assert gaussian_dp_epsilon(0.35, 1e-5) == pytest.approx(1.34, abs=0.005)
    assert gaussian_dp_epsilon(1.78, 1e-5) == pytest.approx(8.68, abs=0.02)


def test_subsampled_run_warns_once_that_it_is_an_approximation():
    acc = GDPAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=0.004, steps=1000)
    with pytest.warns(GDPApproximationWarning, match="approximation"):
        first = acc.get_epsilon(1e-5)
    expected = gaussian_epsilon(0.004 * math.sqrt(1000 * math.expm1(1 / 1.1**2)), 1e-5)
    assert first == pytest.approx(expected, abs=1e-8)


def test_heterogeneous_history_is_refused_with_advice():
    acc = GDPAccountant(warn=False)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=5)
    acc.step(noise_multiplier=2.0, sample_rate=0.01, steps=5)
    with pytest.raises(AccountingError, match="prv"):
        acc.get_epsilon(1e-5)


def test_equal_segments_merge_and_round_trip():
    acc = GDPAccountant(warn=False)
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert acc.history == [(1.0, 0.01, 3)] and len(acc) == 3
    other = GDPAccountant(warn=False)
    other.load_state_dict(acc.state_dict())
    assert other.get_epsilon(1e-5) == acc.get_epsilon(1e-5)


def test_empty_and_noiseless():
    assert GDPAccountant().get_epsilon(1e-5) == 0.0
    acc = GDPAccountant(warn=False)
    acc.step(noise_multiplier=0.0, sample_rate=0.5)
    assert acc.get_epsilon(1e-5) == math.inf
