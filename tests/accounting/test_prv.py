"""The prv accountant against the exact Gaussian mechanism, against rdp, and its edge cases."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from accounting._reference import gaussian_delta, gaussian_delta_by_integration, gaussian_epsilon
from dpcore.builtins.accountants.prv import PRVAccountant
from dpcore.builtins.accountants.rdp import RDPAccountant
from dpcore.errors import AccountingError


def _prv(*segments: tuple[float, float, int], **options) -> PRVAccountant:
    acc = PRVAccountant(**options)
    for sigma, q, steps in segments:
        acc.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    return acc


def test_reference_gaussian_curve_is_the_hockey_stick_integral():
    # the closed form used below, checked against its definition
    for mu, eps in [(0.5, 0.3), (1.0, 1.0), (3.0, 4.0)]:
        assert gaussian_delta(mu, eps) == pytest.approx(
            gaussian_delta_by_integration(mu, eps), rel=1e-7, abs=1e-14
        )


@pytest.mark.parametrize(
    "sigma, steps, delta",
    [(1.0, 1, 1e-5), (0.8, 10, 1e-5), (5.0, 100, 1e-6), (2.0, 100, 1e-3), (20.0, 3, 1e-5)],
)
def test_full_batch_matches_the_exact_gaussian_mechanism(sigma, steps, delta):
    # q = 1: T Gaussian steps are one Gaussian mechanism with mu = sqrt(T) / sigma.
    exact = gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    bounds = _prv((sigma, 1.0, steps)).get_epsilon_bounds(delta)
    assert bounds.lower <= exact <= bounds.upper
    assert bounds.upper - bounds.lower <= 0.025  # 2 eps_error, plus the delta_error slack
    assert bounds.estimate == pytest.approx(exact, abs=2e-3)


def test_heterogeneous_full_batch_history_matches_exact_composition():
    # Gaussian mechanisms compose exactly: mu^2 = sum_i T_i / sigma_i^2.
    acc = _prv((1.0, 1.0, 2), (3.0, 1.0, 20), (1.0, 1.0, 1))
    exact = gaussian_epsilon(math.sqrt(3 / 1.0 + 20 / 9.0), 1e-5)
    bounds = acc.get_epsilon_bounds(1e-5)
    assert bounds.lower <= exact <= bounds.upper


def test_heterogeneous_history_is_order_free_and_between_its_parts():
    a = _prv((1.0, 0.01, 300), (2.0, 0.02, 300)).get_epsilon(1e-5)
    b = _prv((2.0, 0.02, 300), (1.0, 0.01, 300)).get_epsilon(1e-5)
    assert a == pytest.approx(b, abs=1e-9)
    low = _prv((2.0, 0.02, 300)).get_epsilon(1e-5)
    high = _prv((1.0, 0.01, 300), (1.0, 0.01, 300)).get_epsilon(1e-5)
    assert low < a < _prv((1.0, 0.01, 300), (2.0, 0.02, 600)).get_epsilon(1e-5)
    assert high > low


@pytest.mark.parametrize(
    "sigma, q, steps",
    [
        (1.1, 256 / 60000, 14100),  # the MNIST DP-SGD setting
        (0.8, 0.01, 2000),
        (2.0, 0.1, 500),
        (0.6, 0.05, 100),
        (4.0, 0.5, 50),
    ],
)
def test_prv_is_below_rdp(sigma, q, steps):
    rdp = RDPAccountant()
    rdp.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    bounds = _prv((sigma, q, steps)).get_epsilon_bounds(1e-5)
    # the truth is at least `lower`, and RDP is a valid bound: so lower <= rdp always; in
    # these DP-SGD regimes PRV's certified upper bound is tighter than RDP as well
    assert bounds.lower <= rdp.get_epsilon(1e-5)
    assert bounds.upper <= rdp.get_epsilon(1e-5)


def test_mnist_setting_value_and_bounds():
    bounds = _prv((1.1, 256 / 60000, 14100)).get_epsilon_bounds(1e-5)
    assert bounds.lower <= bounds.estimate <= bounds.upper
    assert bounds.upper - bounds.lower <= 0.025
    # RDP gives ~2.6 for this run (see test_rdp); PRV is markedly tighter
    assert 2.2 < bounds.estimate < 2.5


def test_tighter_eps_error_narrows_the_bounds_around_the_same_estimate():
    coarse = _prv((1.0, 0.02, 1000), eps_error=0.1).get_epsilon_bounds(1e-5)
    fine = _prv((1.0, 0.02, 1000), eps_error=0.005).get_epsilon_bounds(1e-5)
    assert fine.upper - fine.lower < coarse.upper - coarse.lower
    assert coarse.lower <= fine.estimate <= coarse.upper
    assert fine.estimate == pytest.approx(coarse.estimate, abs=0.01)


def test_never_negative():
    bounds = _prv((200.0, 0.001, 10)).get_epsilon_bounds(1e-5)
    assert bounds.lower == 0.0 and 0.0 <= bounds.estimate <= bounds.upper <= 0.02
    assert PRVAccountant().get_epsilon(1e-5) == 0.0


def test_large_epsilon_does_not_crash_and_stays_bounded():
    # q = 1, sigma = 0.2, 100 steps: mu = 50, epsilon ~ 1.5e3
    exact = gaussian_epsilon(50.0, 1e-5)
    bounds = _prv((0.2, 1.0, 100)).get_epsilon_bounds(1e-5)
    assert bounds.lower <= exact <= bounds.upper
    assert math.isfinite(_prv((0.5, 0.5, 200)).get_epsilon(1e-5))


def test_no_noise_is_infinite_epsilon():
    assert _prv((0.0, 0.1, 5)).get_epsilon(1e-5) == math.inf


def test_delta_error_must_leave_room_below_delta():
    with pytest.raises(AccountingError, match="delta_error"):
        _prv((1.0, 0.1, 5), delta_error=1e-5).get_epsilon(1e-5)


def _eps(sigma: float, q: float, steps: int) -> float:
    return _prv((sigma, q, steps)).get_epsilon_bounds(1e-5).estimate


@settings(max_examples=8, deadline=None)
@given(
    sigma=st.floats(0.6, 4.0),
    q=st.floats(1e-3, 1.0),
    steps=st.integers(1, 1000),
    factor=st.floats(1.2, 3.0),
)
def test_monotone_in_steps_sigma_and_q(sigma, q, steps, factor):
    base = _eps(sigma, q, steps)
    # Estimates are exact only up to the grid (within eps_error = 0.01 of the truth);
    # for tiny epsilons the rounding spread can dominate the loss itself.
    slack = 0.02
    assert _eps(sigma, q, math.ceil(steps * factor)) >= base - slack
    assert _eps(sigma * factor, q, steps) <= base + slack
    assert _eps(sigma, q / factor, steps) <= base + slack


@settings(max_examples=10, deadline=None)
@given(sigma=st.floats(0.7, 3.0), q=st.floats(1e-3, 0.3), steps=st.integers(1, 3000))
def test_lower_bound_never_exceeds_rdp(sigma, q, steps):
    rdp = RDPAccountant(orders=[1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128])
    rdp.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    bounds = _prv((sigma, q, steps)).get_epsilon_bounds(1e-5)
    assert bounds.lower <= rdp.get_epsilon(1e-5)  # both bound the same true epsilon
    assert bounds.upper <= rdp.get_epsilon(1e-5) + 0.025  # never looser, within its error


@settings(max_examples=10, deadline=None)
@given(
    sigma=st.floats(0.3, 20.0),
    steps=st.integers(1, 5000),
    delta=st.sampled_from([1e-3, 1e-5, 1e-8]),
)
def test_full_batch_bounds_hold_everywhere(sigma, steps, delta):
    exact = gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    bounds = _prv((sigma, 1.0, steps)).get_epsilon_bounds(delta)
    assert bounds.lower <= exact <= bounds.upper


def test_state_round_trips_through_torch_save_weights_only():
    acc = _prv((1.0, 0.01, 100), (1.5, 0.02, 7))
    buf = io.BytesIO()
    torch.save(acc.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = PRVAccountant()
    fresh.load_state_dict(state)
    assert fresh.history == acc.history and len(fresh) == len(acc) == 107
    assert fresh.get_epsilon(1e-5) == acc.get_epsilon(1e-5)


def test_resume_gives_the_same_epsilon_as_never_stopping():
    straight = _prv((1.0, 0.01, 150), (2.0, 0.01, 50))
    first = _prv((1.0, 0.01, 100))
    resumed = PRVAccountant()
    resumed.load_state_dict(first.state_dict())
    resumed.step(noise_multiplier=1.0, sample_rate=0.01, steps=50)
    for _ in range(50):
        resumed.step(noise_multiplier=2.0, sample_rate=0.01)
    assert resumed.history == straight.history
    assert resumed.get_epsilon(1e-5) == straight.get_epsilon(1e-5)


def test_state_of_another_accountant_is_refused():
    rdp = RDPAccountant()
    rdp.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(AccountingError, match="'rdp'"):
        PRVAccountant().load_state_dict(rdp.state_dict())
    with pytest.raises(AccountingError):
        PRVAccountant().load_state_dict({"name": "prv", "history": [[1.0, 2.0, 3]]})


@pytest.mark.parametrize("direction", ["remove", "add"])
@pytest.mark.parametrize("sigma, q", [(1.1, 256 / 60000), (0.8, 0.3), (2.0, 1.0)])
def test_discretisation_keeps_mass_and_mean(direction, sigma, q):
    # The error bound rests on rounding each step's loss to the grid without changing its
    # mean. Reference: E[Y] by quadrature of the definition (KL divergence of the pair).
    from scipy.integrate import quad
    from scipy.stats import norm

    from dpcore.builtins.accountants.prv import discretise

    def loss(z: float) -> float:  # log of the density ratio mixture / N(0, s^2)
        return float(
            np.logaddexp(
                math.log1p(-q) if q < 1 else -np.inf, math.log(q) + (2 * z - 1) / (2 * sigma**2)
            )
        )

    if direction == "remove":  # Z ~ (1 - q) N(0, s^2) + q N(1, s^2), Y = loss(Z)

        def density(z: float) -> float:
            return (1 - q) * norm.pdf(z, scale=sigma) + q * norm.pdf(z, 1, sigma)

        sign = 1.0
    else:  # Z ~ N(0, s^2), Y = -loss(Z)

        def density(z: float) -> float:
            return norm.pdf(z, scale=sigma)

        sign = -1.0
    expected = quad(
        lambda z: density(z) * sign * loss(z),
        -40 * sigma,
        40 * sigma + 1,
        limit=500,
        epsabs=1e-15,
        epsrel=1e-12,
    )[0]
    d = discretise(sigma, q, direction, 1e-4, 1e-14)
    assert d.pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert d.mean == pytest.approx(float(d.pmf @ d.values), rel=1e-12)
    assert d.mean == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_works_in_a_forked_child():
    # DataLoader workers fork; the child must not wait on its parent's thread pool.
    _prv((1.0, 0.01, 100)).get_epsilon(1e-5)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            eps = _prv((1.0, 0.02, 100)).get_epsilon(1e-5)
            os.write(write, repr(eps).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert float(os.read(read, 100).decode()) == _prv((1.0, 0.02, 100)).get_epsilon(1e-5)


@pytest.mark.parametrize("sigma, steps, delta", [(1.0, 100, 1e-10), (2.0, 1000, 1e-12)])
def test_small_deltas_stay_bounded_with_float_error_in_the_slack(sigma, steps, delta):
    exact = gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    bounds = _prv((sigma, 1.0, steps)).get_epsilon_bounds(delta)
    assert bounds.lower <= exact <= bounds.upper


def test_delta_below_float_resolution_is_refused():
    with pytest.raises(AccountingError, match="too small"):
        _prv((1.0, 1.0, 100)).get_epsilon(1e-15)
