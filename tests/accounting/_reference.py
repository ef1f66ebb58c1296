"""Independent reference values for the accountant tests (derived here, not imported
from the code under test)."""

from __future__ import annotations

import math

import numpy as np
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.stats import norm


def gaussian_delta(mu: float, eps: float) -> float:
    """delta(eps) of the Gaussian mechanism with mu = sensitivity / std, from its closed
    form Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle & Wang 2018), evaluated
    in log space so that a large eps does not overflow."""
    log_a = float(norm.logcdf(-eps / mu + mu / 2))
    log_b = eps + float(norm.logcdf(-eps / mu - mu / 2))
    return math.exp(log_a) * -math.expm1(min(log_b - log_a, 0.0))


def gaussian_delta_by_integration(mu: float, eps: float) -> float:
    """The same quantity as a hockey-stick divergence integral between N(mu, 1) and N(0, 1)."""
    f = lambda x: max(norm.pdf(x - mu) - math.exp(eps) * norm.pdf(x), 0.0)  # noqa: E731
    return float(quad(f, -20 + mu, 20 + mu, points=[eps / mu + mu / 2], limit=200)[0])


def gaussian_epsilon(mu: float, delta: float) -> float:
    """eps with gaussian_delta(mu, eps) = delta (0 when even eps = 0 meets delta)."""
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(mu, hi) > delta:
        hi *= 2
    return float(brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-12))


def sgm_rdp_by_integration(sigma: float, q: float, alpha: float) -> float:
    """RDP of the subsampled Gaussian as the integral of its definition:
    log E_{z~N(0,s^2)}[(1 - q + q exp((2z - 1) / (2 s^2)))^alpha] / (alpha - 1),
    integrated with the integrand scaled by its maximum (it spans many magnitudes)."""

    def log_integrand(z):  # works on floats and arrays
        log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return (
            -0.5 * (z / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi)) + alpha * log_ratio
        )

    grid = np.linspace(-30 * sigma, 30 * sigma + alpha, 20001)
    logs = log_integrand(grid)
    peak, top = float(grid[np.argmax(logs)]), float(np.max(logs))
    value = quad(
        lambda z: math.exp(float(log_integrand(z)) - top),
        grid[0],
        grid[-1],
        points=[peak],
        limit=1000,
        epsabs=0,
        epsrel=1e-12,
    )[0]
    return (top + math.log(value)) / (alpha - 1)
