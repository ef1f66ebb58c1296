"""Rényi DP of the Poisson-subsampled Gaussian mechanism.

One step releases ``M(D) = sum_{i in batch} g_i + N(0, sigma^2)`` where each example
joins the batch independently with probability ``q`` and ``||g_i|| <= 1``. The Rényi
divergence of order alpha between the output distributions with and without one
example is that of the pair ``mu = (1 - q) N(0, sigma^2) + q N(1, sigma^2)`` and
``mu0 = N(0, sigma^2)`` (Mironov, Talwar and Zhang, 2019), i.e.

    RDP(alpha) = log(A_alpha) / (alpha - 1),
    A_alpha = E_{z ~ mu0} [ (1 - q + q exp((2z - 1) / (2 sigma^2)))^alpha ].

Integer alpha: expand the power binomially; each term is a Gaussian moment,
E[exp(k (2z - 1) / (2 sigma^2))] = exp((k^2 - k) / (2 sigma^2)), so

    A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)).

Fractional alpha: the binomial series of (1 + x)^alpha only converges for |x| < 1, so
split the integral at z0, where q exp((2z - 1) / (2 sigma^2)) = 1 - q, i.e.
z0 = sigma^2 log(1/q - 1) + 1/2. Below z0 expand in powers of the q-term, above z0 in
powers of the (1 - q)-term. A half-line Gaussian moment is a shifted normal CDF:
integral_{-inf}^{z0} mu0(z) exp(k (2z - 1) / (2 sigma^2)) dz
    = exp((k^2 - k) / (2 sigma^2)) Phi((z0 - k) / sigma), hence

    A_alpha = sum_{k>=0} C(alpha, k) [ (1 - q)^(alpha - k) q^k e^{(k^2 - k)/(2 sigma^2)} Phi((z0 - k)/sigma)
                                     + (1 - q)^k q^(alpha - k) e^{(j^2 - j)/(2 sigma^2)} Phi((j - z0)/sigma) ],
    with j = alpha - k.

Everything is summed in log space (signed logsumexp: C(alpha, k) alternates in sign
for k > alpha) in float64 with scipy's special functions. Two refinements:

* A - 1 rather than A: the binomial weights sum to one (for q < 1/2 in the series), so
  subtracting them term by term (expm1) keeps full relative precision when the
  divergence is tiny (small q, large sigma), where log(A) would lose it all.
* Past max(alpha, z0) the series alternates with smooth, slowly (polynomially)
  decaying terms; its tail is summed by repeated averaging of partial sums (Euler's
  transform), a few hundred terms instead of ~1e5. The plain sum is the fallback.

RDP converts to (epsilon, delta) with the bound of Balle et al. (2020, Thm. 21) /
Canonne, Kamath and Steinke (2020): for every order alpha > 1,

    epsilon = RDP(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1),

minimised over the orders; the minimising order is reported too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy.special import gammaln, gammasgn, log_ndtr, logsumexp

from dpcore.accounting import HistoryAccountant, check_delta, check_noise_multiplier
from dpcore.accounting import check_sample_rate as _check_q
from dpcore.errors import AccountingError

#: Orders used by default: a fine grid where the optimum usually lies for
#: practical budgets (epsilon ~ 0.5..10), then coarser up to 256 for tiny deltas
#: or very large noise.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10 for x in range(1, 100)]
    + list(range(11, 64))
    + [64, 72, 80, 96, 112, 128, 160, 192, 256]
)

# A term below exp(-_NEGLIGIBLE) times the running sum changes nothing in float64.
_NEGLIGIBLE = 40.0
_CHUNK = 512
_MAX_TERMS = 1 << 22


def _log_binom(alpha: float, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log|C(alpha, k)| and its sign, for real alpha and integer k >= 0."""
    log_abs = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    sign = gammasgn(alpha - k + 1)
    return log_abs, sign


def _log_abs_expm1(x: np.ndarray) -> np.ndarray:
    """log|e^x - 1| without overflow or cancellation."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        big = x > 30
        positive = np.log(np.expm1(np.where(big, 1.0, x)))
        positive = np.where(big, x + np.log1p(-np.exp(-np.where(big, x, 0.0))), positive)
        negative = np.log(-np.expm1(np.minimum(x, 0.0)))
    return np.where(x > 0, positive, negative)


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    # The binomial weights C(a, k) (1 - q)^(a - k) q^k sum to one and the k = 0, 1 terms
    # have exp(0) = 1, so A - 1 is a sum of positive terms: computing it directly keeps
    # full relative precision even when the divergence is tiny (small q, large sigma).
    k = np.arange(2, alpha + 1, dtype=np.float64)
    log_c, _ = _log_binom(float(alpha), k)
    log_excess = log_c + k * math.log(q) + (alpha - k) * math.log1p(-q)
    log_excess = log_excess + _log_abs_expm1((k * k - k) / (2 * sigma**2))
    return float(np.logaddexp(0.0, logsumexp(log_excess)))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    accelerated = _log_a_fractional_accelerated(q, sigma, alpha)
    if accelerated is not None:
        return accelerated
    return _log_a_fractional_direct(q, sigma, alpha)


def _series_terms(
    q: float, sigma: float, alpha: float, k: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], bool]:
    """(log|term|, sign) of the below-z0 and above-z0 series at indices k, and whether
    they sum to A - 1 (else to A).

    For q < 1/2 the binomial weights C(alpha, k) (1 - q)^(alpha - k) q^k of the
    below-z0 series sum to one, so subtracting them term by term (expm1) yields A - 1
    with no large cancelling terms: full relative precision for tiny divergences.
    """
    s2 = sigma**2
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = s2 * (log_1mq - log_q) + 0.5
    j = alpha - k
    log_c, sign = _log_binom(alpha, k)
    log_weight = log_c + j * log_1mq + k * log_q
    moment = (k * k - k) / (2 * s2) + log_ndtr((z0 - k) / sigma)  # log of e^c_k Phi(.)
    minus_one = q < 0.5
    if minus_one:
        below = (log_weight + _log_abs_expm1(moment), sign * np.sign(moment))
    else:
        below = (log_weight + moment, sign)
    above_log = log_c + k * log_1mq + j * log_q + (j * j - j) / (2 * s2)
    above = (above_log + log_ndtr((j - z0) / sigma), sign)
    return below, above, minus_one


def _finish(log_sum: float, minus_one: bool) -> float:
    return float(np.logaddexp(0.0, log_sum)) if minus_one else log_sum


def _log_a_fractional_accelerated(q: float, sigma: float, alpha: float) -> float | None:
    """The series summed until its terms are smooth and alternating, then its tail by
    repeated averaging of partial sums (Euler's transform for alternating series).

    The terms decay only polynomially when q is not small, so plain summation needs
    ~1e5 terms per order; this needs a few hundred. Returns None (use the direct sum)
    if the averages do not settle to float64 precision.
    """
    z0 = sigma**2 * (math.log1p(-q) - math.log(q)) + 0.5
    count = math.ceil(max(alpha, z0) + 10 * sigma) + 128
    k = np.arange(count, dtype=np.float64)
    (log_b, sign_b), (log_a, sign_a), minus_one = _series_terms(q, sigma, alpha, k)
    ref = float(max(log_b.max(), log_a.max()))
    if not math.isfinite(ref):
        return None
    values = sign_b * np.exp(log_b - ref) + sign_a * np.exp(log_a - ref)
    partial = np.cumsum(values)
    if abs(values[-1]) < 1e-17 * abs(partial[-1]):
        total = float(partial[-1])
    else:
        sums, total = partial[-64:], float("nan")
        previous = float(sums[-1])
        for _ in range(60):
            sums = 0.5 * (sums[:-1] + sums[1:])
            if abs(sums[-1] - previous) <= 1e-15 * abs(sums[-1]):
                total = float(sums[-1])
                break
            previous = float(sums[-1])
    if not total > 0:
        return None
    return _finish(ref + math.log(total), minus_one)


def _log_a_fractional_direct(q: float, sigma: float, alpha: float) -> float:
    """The plain sum, in growing chunks until the terms are negligible (a fallback)."""
    z0 = sigma**2 * (math.log1p(-q) - math.log(q)) + 0.5
    log_pos = log_neg = -math.inf  # running log-sums of the positive and negative terms
    k0, chunk = 0, _CHUNK
    minus_one = False
    while True:
        k = np.arange(k0, k0 + chunk, dtype=np.float64)
        (log_b, sign_b), (log_a, sign_a), minus_one = _series_terms(q, sigma, alpha, k)
        terms = np.concatenate([log_b, log_a])
        signs = np.concatenate([sign_b, sign_a])
        pos, neg = terms[signs > 0], terms[signs < 0]
        if pos.size:
            log_pos = float(np.logaddexp(log_pos, logsumexp(pos)))
        if neg.size:
            log_neg = float(np.logaddexp(log_neg, logsumexp(neg)))
        k0 += chunk
        chunk = min(2 * chunk, 1 << 18)  # slow (polynomial) tails: grow the chunks
        # Past k > alpha (and z0) the terms alternate and shrink, so the error of
        # stopping is at most the size of the last term.
        last = max(log_b[-1], log_a[-1])
        if k0 > max(alpha, z0) + 1 and last < log_pos - _NEGLIGIBLE:
            break
        if k0 >= _MAX_TERMS:
            raise AccountingError(
                f"the RDP series for order {alpha} did not converge (q={q}, sigma={sigma}); "
                "use integer orders"
            )
    if not log_neg < log_pos:
        raise AccountingError(
            f"the RDP series for order {alpha} lost all precision (q={q}, sigma={sigma})"
        )
    return _finish(log_pos + math.log1p(-math.exp(log_neg - log_pos)), minus_one)


def rdp_subsampled_gaussian(sigma: float, q: float, alpha: float) -> float:
    """RDP of order ``alpha`` of one Poisson-subsampled Gaussian step (sensitivity 1)."""
    sigma = check_noise_multiplier(sigma)
    q = _check_q(q)
    if not alpha > 1:
        raise AccountingError(f"RDP orders must be > 1, got {alpha!r}")
    if sigma == 0:
        return math.inf
    if q == 1.0:  # the Gaussian mechanism itself
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        log_a = _log_a_integer(q, sigma, int(alpha))
    else:
        log_a = _log_a_fractional(q, sigma, float(alpha))
    return max(log_a, 0.0) / (alpha - 1)


@functools.lru_cache(maxsize=256)
def _rdp_vector(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    out = np.array([rdp_subsampled_gaussian(sigma, q, a) for a in orders], dtype=np.float64)
    out.setflags(write=False)
    return out


def rdp_to_epsilon(
    rdp: Sequence[float] | np.ndarray, orders: Sequence[float], delta: float
) -> tuple[float, float]:
    """``(epsilon, best_order)`` from RDP values (Balle et al. 2020, Thm. 21)."""
    delta = check_delta(delta)
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    return max(float(eps[i]), 0.0), float(a[i])


class RDPOptions(BaseModel):
    """Options of the ``rdp`` accountant."""

    model_config = ConfigDict(extra="forbid")

    orders: list[float] | None = Field(
        default=None,
        description="Rényi orders (> 1) to optimise over; default: 1.1..10.9 by 0.1, 11..63, "
        "then up to 256",
    )

    @field_validator("orders")
    @classmethod
    def _orders_above_one(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not a > 1 for a in v)):
            raise ValueError("orders must be a non-empty list of numbers > 1")
        return v


class RDPAccountant(HistoryAccountant):
    """Rényi DP of the subsampled Gaussian (exact at every order), optimal order conversion."""

    name = "rdp"

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        super().__init__()
        self.orders: tuple[float, ...] = tuple(
            float(a) for a in (orders if orders is not None else DEFAULT_ORDERS)
        )
        if not self.orders or any(not a > 1 for a in self.orders):
            raise AccountingError("RDP orders must be a non-empty list of numbers > 1")

    def get_rdp(self) -> np.ndarray:
        """RDP of the whole history at each of :attr:`orders` (composition adds RDP)."""
        total = np.zeros(len(self.orders))
        for (sigma, q), steps in self.events().items():
            total = total + steps * _rdp_vector(sigma, q, self.orders)
        return total

    def get_privacy_spent(self, delta: float) -> tuple[float, float]:
        """``(epsilon, best_order)`` for ``delta``."""
        delta = check_delta(delta)
        if not self.history:
            return 0.0, self.orders[0]
        return rdp_to_epsilon(self.get_rdp(), self.orders, delta)

    def get_epsilon(self, delta: float) -> float:
        return self.get_privacy_spent(delta)[0]
