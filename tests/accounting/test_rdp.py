"""The rdp accountant against closed forms, numerical integrals and published values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accounting._reference import sgm_rdp_by_integration
from dpcore.builtins.accountants.rdp import (
    DEFAULT_ORDERS,
    RDPAccountant,
    rdp_subsampled_gaussian,
    rdp_to_epsilon,
)
from dpcore.errors import AccountingError


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("alpha", [1.5, 2, 7.25, 32])
def test_full_batch_is_the_gaussian_mechanism(sigma, alpha):
    # q = 1: RDP of N(0, s^2) vs N(1, s^2) is alpha / (2 s^2) (Mironov 2017, Prop. 7).
    assert rdp_subsampled_gaussian(sigma, 1.0, alpha) == pytest.approx(alpha / (2 * sigma**2))


@pytest.mark.parametrize("alpha", [2, 5, 1.5, 3.3, 10.7])
def test_series_tends_to_the_gaussian_mechanism_as_q_tends_to_one(alpha):
    # Exercises the general series (integer and fractional) rather than the q = 1 shortcut.
    sigma = 1.3
    got = rdp_subsampled_gaussian(sigma, 1 - 1e-9, alpha)
    assert got == pytest.approx(alpha / (2 * sigma**2), rel=1e-6)


@pytest.mark.parametrize(
    "sigma, q, alpha",
    [
        (1.1, 256 / 60000, 1.5),
        (1.1, 256 / 60000, 8.1),
        (1.1, 256 / 60000, 32),
        (1.0, 0.5, 1.1),
        (0.8, 0.3, 2.5),
        (0.8, 0.3, 4),
        (2.0, 0.9, 7.3),
        (0.5, 0.01, 3.7),
        (4.0, 0.05, 63),
    ],
)
def test_matches_numerical_integration_of_the_definition(sigma, q, alpha):
    expected = sgm_rdp_by_integration(sigma, q, alpha)
    assert rdp_subsampled_gaussian(sigma, q, alpha) == pytest.approx(expected, rel=1e-8)


def test_fractional_orders_are_continuous_with_integer_orders():
    for alpha in (2, 3, 12):
        exact = rdp_subsampled_gaussian(1.0, 0.02, alpha)
        assert rdp_subsampled_gaussian(1.0, 0.02, alpha + 1e-7) == pytest.approx(exact, rel=1e-5)
        assert rdp_subsampled_gaussian(1.0, 0.02, alpha - 1e-7) == pytest.approx(exact, rel=1e-5)


# TensorFlow Privacy's MNIST tutorial (tensorflow/privacy, tutorials/README.md, "Select
# Parameters"; epsilon at delta = 1e-5, q = 256/60000, 60000 // 256 = 234 steps per epoch)
# with its orders [1 + x/10 for x in 1..99] + [12..63] and the classic conversion
# eps = min_alpha RDP(alpha) + log(1/delta) / (alpha - 1).
TF_PRIVACY_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))


@pytest.mark.parametrize(
    "sigma, epochs, published",
    [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)],
)
def test_published_tf_privacy_mnist_values(sigma, epochs, published):
    acc = RDPAccountant(orders=TF_PRIVACY_ORDERS)
    acc.step(noise_multiplier=sigma, sample_rate=256 / 60000, steps=epochs * 234)
    orders = np.array(TF_PRIVACY_ORDERS)
    classic = float(np.min(acc.get_rdp() + math.log(1 / 1e-5) / (orders - 1)))
    assert classic == pytest.approx(published, abs=0.01)
    # the improved conversion (Balle et al. 2020) is never worse
    assert acc.get_epsilon(1e-5) < classic


def test_privacy_spent_reports_the_optimal_order():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, steps=14100)
    eps, order = acc.get_privacy_spent(1e-5)
    assert order in DEFAULT_ORDERS
    rdp = acc.get_rdp()
    a = np.array(DEFAULT_ORDERS)
    each = rdp + np.log1p(-1 / a) - (math.log(1e-5) + np.log(a)) / (a - 1)
    assert eps == pytest.approx(each.min()) and order == a[np.argmin(each)]
    assert 2.4 < eps < 2.8  # far below the classic conversion's ~3.0 for the same run


def test_rdp_to_epsilon_never_negative_and_inf_for_no_noise():
    assert rdp_to_epsilon([0.0, 0.0], [2.0, 3.0], 0.5)[0] == 0.0
    acc = RDPAccountant()
    acc.step(noise_multiplier=0.0, sample_rate=0.1, steps=3)
    assert acc.get_epsilon(1e-5) == math.inf
    assert RDPAccountant().get_epsilon(1e-5) == 0.0


def test_composition_adds_rdp_over_heterogeneous_history():
    acc = RDPAccountant(orders=[2, 4.5])
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    acc.step(noise_multiplier=2.0, sample_rate=0.05, steps=5)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=3)
    expected = [
        13 * rdp_subsampled_gaussian(1.0, 0.01, a) + 5 * rdp_subsampled_gaussian(2.0, 0.05, a)
        for a in (2, 4.5)
    ]
    np.testing.assert_allclose(acc.get_rdp(), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": -1.0, "sample_rate": 0.1},
        {"noise_multiplier": 1.0, "sample_rate": 0.0},
        {"noise_multiplier": 1.0, "sample_rate": 1.5},
        {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -1},
        {"noise_multiplier": float("nan"), "sample_rate": 0.1},
    ],
)
def test_invalid_steps_are_refused(kwargs):
    with pytest.raises(AccountingError):
        RDPAccountant().step(**kwargs)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_invalid_delta_is_refused(delta):
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(AccountingError, match="delta"):
        acc.get_epsilon(delta)


def _eps(sigma: float, q: float, steps: int) -> float:
    # a few integer and fractional orders keep hypothesis fast; monotonicity holds per order
    acc = RDPAccountant(orders=[1.5, 2, 2.75, 4, 6.5, 10, 16, 32, 64])
    acc.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    return acc.get_epsilon(1e-5)


sigmas = st.floats(0.5, 5.0)
rates = st.floats(1e-3, 1.0)
step_counts = st.integers(1, 5000)


@settings(max_examples=25, deadline=None)
@given(sigma=sigmas, q=rates, steps=step_counts, factor=st.floats(1.05, 3.0))
def test_monotone_in_steps_sigma_and_q(sigma, q, steps, factor):
    base = _eps(sigma, q, steps)
    assert _eps(sigma, q, math.ceil(steps * factor)) >= base
    assert _eps(sigma * factor, q, steps) <= base
    assert _eps(sigma, q / factor, steps) <= base


@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("q", [1e-4, 0.01, 0.3, 0.9])
@pytest.mark.parametrize("alpha", [1.1, 2.5, 7.9])
def test_accelerated_series_equals_the_plain_sum(sigma, q, alpha):
    from dpcore.builtins.accountants.rdp import (
        _log_a_fractional_accelerated,
        _log_a_fractional_direct,
    )

    fast = _log_a_fractional_accelerated(q, sigma, alpha)
    assert fast is not None
    assert fast == pytest.approx(_log_a_fractional_direct(q, sigma, alpha), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "sigma, q, alpha",
    [(10.0, 1e-4, 2), (10.0, 1e-4, 1.5), (10.0, 1e-4, 7.3), (50.0, 0.3, 3.5), (30.0, 0.7, 2.5)],
)
def test_tiny_divergences_keep_full_relative_precision(sigma, q, alpha):
    # Reference: the defining integral in 40-digit arithmetic (mpmath).
    import mpmath as mp

    mp.mp.dps = 40
    s, qq, a = mp.mpf(sigma), mp.mpf(q), mp.mpf(alpha)

    def integrand(z):
        ratio = 1 - qq + qq * mp.exp((2 * z - 1) / (2 * s**2))
        return mp.npdf(z, 0, s) * ratio**a

    value = mp.quad(integrand, [-mp.inf, -5 * s, 0, 5 * s, mp.inf])
    expected = float(mp.log(value) / (a - 1))
    assert rdp_subsampled_gaussian(sigma, q, alpha) == pytest.approx(expected, rel=1e-9)
