"""Gaussian DP of DP-SGD through the central limit theorem (Bu, Dong, Long and Su, 2020).

T Poisson-subsampled Gaussian steps at rate q are asymptotically mu-GDP with

    mu = q sqrt(T (exp(1 / sigma^2) - 1)),

as T grows with q sqrt(T) fixed. A mu-GDP mechanism is (epsilon, delta)-DP exactly when

    delta(epsilon) = Phi(-epsilon / mu + mu / 2) - e^epsilon Phi(-epsilon / mu - mu / 2).

The limit is an *approximation*, not a bound: with few steps, large q or small sigma it
can understate epsilon. At q = 1 there is nothing to approximate: T Gaussian steps are
exactly (sqrt(T) / sigma)-GDP, and that is what is used.
"""

from __future__ import annotations

import math
import warnings

from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import brentq
from scipy.special import log_ndtr

from dpcore.accounting import HistoryAccountant, check_delta
from dpcore.errors import AccountingError


class GDPApproximationWarning(UserWarning):
    """The GDP accountant's central-limit epsilon is an approximation, not a bound."""


def gaussian_dp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism (computed stably in log space)."""
    if mu == 0:
        return 0.0
    a = log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + log_ndtr(-epsilon / mu - mu / 2)
    if b >= a:
        return 0.0
    return float(math.exp(a) * -math.expm1(b - a))


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon >= 0 with delta(epsilon) <= delta for a mu-GDP mechanism."""
    if mu == 0 or gaussian_dp_delta(mu, 0.0) <= delta:
        return 0.0
    if not math.isfinite(mu):
        return math.inf
    hi = max(1.0, mu * mu)
    while gaussian_dp_delta(mu, hi) > delta:
        hi *= 2
    return float(brentq(lambda e: gaussian_dp_delta(mu, e) - delta, 0.0, hi, xtol=1e-12))


def clt_mu(sigma: float, q: float, steps: int) -> float:
    """mu of ``steps`` Poisson-subsampled Gaussian steps (exact at q = 1)."""
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return math.sqrt(steps) / sigma
    return q * math.sqrt(steps * math.expm1(1.0 / sigma**2))


class GDPOptions(BaseModel):
    """Options of the ``gdp`` accountant."""

    model_config = ConfigDict(extra="forbid")

    warn: bool = Field(
        default=True, description="warn that the CLT epsilon is an approximation (once)"
    )


class GDPAccountant(HistoryAccountant):
    """Gaussian DP via the central limit theorem: fast, approximate, homogeneous runs only."""

    name = "gdp"

    def __init__(self, warn: bool = True) -> None:
        super().__init__()
        self.warn = warn
        self._warned = False

    def get_mu(self) -> float:
        if not self.history:
            return 0.0
        events = self.events()
        if len(events) > 1:
            kinds = ", ".join(f"(sigma={s}, q={q})" for s, q in events)
            raise AccountingError(
                f"the gdp accountant only composes identical steps, but the history mixes "
                f"{kinds}; use the prv (or rdp) accountant for changing noise or sample rate"
            )
        (((sigma, q), steps),) = events.items()
        return clt_mu(sigma, q, steps)

    def get_epsilon(self, delta: float) -> float:
        delta = check_delta(delta)
        mu = self.get_mu()
        if self.warn and not self._warned and any(q < 1 for _, q, _ in self.history):
            self._warned = True
            warnings.warn(
                "the gdp accountant's epsilon comes from a central limit theorem: it is an "
                "approximation that can understate the privacy loss, especially with few "
                "steps, a large sample rate or little noise. Report epsilon from the prv "
                "accountant (a certified upper bound).",
                GDPApproximationWarning,
                stacklevel=2,
            )
        return gaussian_dp_epsilon(mu, delta)


__all__ = [
    "GDPAccountant",
    "GDPApproximationWarning",
    "GDPOptions",
    "clt_mu",
    "gaussian_dp_delta",
    "gaussian_dp_epsilon",
]
