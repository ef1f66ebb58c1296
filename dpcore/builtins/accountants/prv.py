"""Privacy random variables (PRV): numerical composition with a certified error bound.

For a pair of output distributions (P, Q) the privacy loss random variable is
Y = log(P(Z) / Q(Z)) with Z ~ P, and

    delta(epsilon) = E[(1 - exp(epsilon - Y))_+].

Composition adds independent privacy losses, so the delta curve of T steps is that of
Y_1 + ... + Y_T (Gopi, Lee and Wutschitz, 2021). For the Poisson-subsampled Gaussian
both neighbouring directions are composed and the larger delta is kept:

* remove one example: P = (1 - q) N(0, s^2) + q N(1, s^2), Q = N(0, s^2),
  Y = L(Z) with L(z) = log(1 - q + q exp((2z - 1) / (2 s^2))), Z ~ P;
* add one example: P = N(0, s^2), Q = (1 - q) N(0, s^2) + q N(1, s^2), Y = -L(Z), Z ~ N(0, s^2).

L is monotone, so each Y has a closed-form CDF through the normal CDF.

How the numbers are made, and why the bound holds:

1. Clip each Y to [y_lo, y_hi] (grid points) where the probability outside is at most
   tau per step; all T steps stay inside except with probability <= T * tau (union
   bound), and delta moves by at most that.
2. Discretise onto the grid {j * h} by *mean-preserving* rounding: a value between two
   grid points is split between them in proportion to its distance, so the rounded
   variable equals Y plus a zero-mean error of range h (the split of each cell is
   computed with composite Simpson on the CDF, refined where the loss is only a few
   cells wide). Given the Y's, the errors are independent, so by Hoeffding the total rounding
   error of T steps exceeds t with probability at most exp(-2 t^2 / (T h^2)); choosing
   h = t / sqrt(T log(1 / p) / 2) makes that p. Then, for every epsilon,
   delta_true(epsilon + t) - p <= delta_grid(epsilon) <= delta_true(epsilon - t) + p.
3. Compose on a circular grid by FFT: scipy.fft of each distinct step, raised to the
   power of its step count in Fourier space, multiplied, transformed back. The window
   is sized by a Chernoff bound from the discrete steps' own moment generating
   functions, so the mass that wraps around is at most a known p.
4. Solve delta_grid(epsilon) = delta' exactly (delta_grid is piecewise exponential
   between grid points). With p_total = rounding + clipping + wrap-around <=
   delta_error:

       upper    = epsilon_grid(delta - delta_error) + t    (a certified upper bound)
       estimate = epsilon_grid(delta)
       lower    = epsilon_grid(delta + delta_error) - t

   clamped at 0 (epsilon is never negative). Floating-point round-off of the FFTs is
   measured on the result (its smallest entry) and added to delta_error; a delta too
   small to resolve is refused. Not in the budget: the quadrature error of the cell
   splits (a step's mean is kept to ~1e-7 of the mesh; tests check it against an
   integral). t is ``eps_error`` unless the grid would
   exceed ``max_grid`` points (huge epsilon), in which case h grows and the bounds
   honestly report the larger t.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import scipy.fft
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import brentq
from scipy.signal import lfilter
from scipy.special import log_ndtr, ndtr, ndtri

from dpcore.accounting import HistoryAccountant, check_delta
from dpcore.errors import AccountingError

Direction = Literal["remove", "add"]


class EpsilonBounds(NamedTuple):
    """Epsilon for one delta: ``lower <= true epsilon <= upper``; ``estimate`` is the
    value on the grid, typically far closer to the truth than the bounds."""

    lower: float
    estimate: float
    upper: float


# ----------------------------------------------------------------------------------------
# One step: CDF of the privacy loss and its discretisation
# ----------------------------------------------------------------------------------------
def _loss(z: np.ndarray | float, sigma: float, q: float) -> np.ndarray:
    """L(z) = log(1 - q + q exp((2z - 1) / (2 sigma^2))), without overflow."""
    w = (2 * np.asarray(z, dtype=np.float64) - 1) / (2 * sigma**2)
    if q == 1.0:
        return w
    return np.logaddexp(math.log1p(-q), math.log(q) + w)


def _inverse_loss(y: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """z with L(z) = y (y > log(1 - q)); -inf at or below the bottom of L's range."""
    if q == 1.0:
        return sigma**2 * y + 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = np.expm1(y) + q
        # log((e^y - 1 + q) / q); for large y use y + log1p(...) to stay finite
        big = y > 30
        log_ratio = np.where(
            big,
            y + np.log1p((q - 1) * np.exp(-np.where(big, y, 0.0))) - math.log(q),
            np.log(np.where(inner > 0, inner, np.nan)) - math.log(q),
        )
        z = sigma**2 * log_ratio + 0.5
    return np.where(inner > 0, z, -np.inf)


def _tail_probability(
    y: np.ndarray, sigma: float, q: float, direction: Direction, upper: np.ndarray
) -> np.ndarray:
    """P(Y > y) where ``upper`` else P(Y <= y), each computed directly so that small
    probabilities keep their relative precision (no 1 - x cancellation)."""
    sign = np.where(upper, -1.0, 1.0)
    if direction == "remove":
        z = _inverse_loss(y, sigma, q)
        with np.errstate(invalid="ignore"):
            out = (1 - q) * ndtr(sign * z / sigma) + q * ndtr(sign * (z - 1) / sigma)
    else:  # Y = -L(Z), Z ~ N(0, sigma^2): Y <= y  <=>  Z >= L^{-1}(-y)
        z = _inverse_loss(-y, sigma, q)
        with np.errstate(invalid="ignore"):
            out = ndtr(-sign * z / sigma)
    return out


def _support(sigma: float, q: float, direction: Direction, tau: float) -> tuple[float, float]:
    """[y_lo, y_hi] outside which Y has probability at most tau on each side."""
    if direction == "add":  # quantiles of Z ~ N(0, s^2), mapped through -L (decreasing)
        z_top = -sigma * float(ndtri(tau))  # P(Z > z_top) = tau
        y_lo = -float(_loss(z_top, sigma, q))
        y_hi = -float(_loss(-z_top, sigma, q))
        return y_lo, y_hi

    log_q = math.log(q)
    log_1mq = math.log1p(-q) if q < 1 else -math.inf

    def log_cdf(z: float) -> float:  # log P(Z <= z), Z ~ (1 - q) N(0, s^2) + q N(1, s^2)
        return float(np.logaddexp(log_1mq + log_ndtr(z / sigma), log_q + log_ndtr((z - 1) / sigma)))

    def log_sf(z: float) -> float:
        return float(
            np.logaddexp(log_1mq + log_ndtr(-z / sigma), log_q + log_ndtr((1 - z) / sigma))
        )

    span = -sigma * float(ndtri(tau)) + 2
    log_tau = math.log(tau)
    z_lo = brentq(lambda z: log_cdf(z) - log_tau, -span - 1, span, xtol=1e-12)
    z_hi = brentq(lambda z: log_sf(z) - log_tau, -span, span + 1, xtol=1e-12)
    return float(_loss(z_lo, sigma, q)), float(_loss(z_hi, sigma, q))


def _median(sigma: float, q: float, direction: Direction) -> float:
    """A point near the median of Y (any point works; near the median is most precise)."""
    if direction == "remove":
        z = brentq(
            lambda z: (1 - q) * ndtr(z / sigma) + q * ndtr((z - 1) / sigma) - 0.5,
            -10 * sigma - 1,
            10 * sigma + 1,
        )
        return float(_loss(z, sigma, q))
    return -float(_loss(0.0, sigma, q))


@dataclass(frozen=True)
class DiscreteLoss:
    """A privacy loss on the grid: ``pmf[i]`` is the probability of ``(offset + i) * h``."""

    offset: int
    pmf: np.ndarray
    h: float
    clipped: float  # probability that the un-clipped loss lies outside the grid
    mean: float

    @property
    def values(self) -> np.ndarray:
        return (self.offset + np.arange(self.pmf.size)) * self.h

    def log_mgf(self, lambdas: np.ndarray) -> np.ndarray:
        """An upper bound on log E[exp(lambda Y)] for each lambda.

        Computed after mean-preserving re-binning onto a coarser grid, which can only
        increase the moment generating function (Jensen), so the bound stays valid.
        """
        ratio = max(1, self.pmf.size // 2048)
        if ratio > 1:
            idx = self.offset + np.arange(self.pmf.size)
            coarse, frac = np.divmod(idx, ratio)
            w_up = frac / ratio
            base = int(coarse[0])
            binned = np.bincount(coarse - base, self.pmf * (1 - w_up), minlength=0)
            up = np.bincount(coarse - base + 1, self.pmf * w_up)
            size = max(binned.size, up.size)
            pmf = np.zeros(size)
            pmf[: binned.size] += binned
            pmf[: up.size] += up
            values = (base + np.arange(size)) * (self.h * ratio)
        else:
            pmf, values = self.pmf, self.values
        keep = pmf > 0
        logp, v = np.log(pmf[keep]), values[keep]
        x = logp[None, :] + lambdas[:, None] * v[None, :]
        top = x.max(axis=1)
        return top + np.log(np.exp(x - top[:, None]).sum(axis=1))


@functools.lru_cache(maxsize=32)
def discretise(sigma: float, q: float, direction: Direction, h: float, tau: float) -> DiscreteLoss:
    """One Poisson-subsampled Gaussian step's privacy loss, clipped and rounded onto the
    grid of mesh ``h`` without changing its mean."""
    y_lo, y_hi = _support(sigma, q, direction, tau)
    j_lo, j_hi = math.floor(y_lo / h), math.ceil(y_hi / h)
    if j_hi - j_lo > 50_000_000:
        raise AccountingError(
            f"the privacy loss of one step (sigma={sigma}, q={q}) is too spread out for the "
            f"grid; increase eps_error"
        )
    if j_hi == j_lo:
        j_hi += 1
    cells = j_hi - j_lo
    # Each cell's split is an integral of the CDF over the cell, by composite Simpson on
    # `panels` sub-intervals: one suffices when the bulk of the loss spans many cells; a
    # bulk only a few cells wide (tiny q) gets more, so that the split stays accurate.
    bulk = abs(float(_loss(sigma, sigma, q)) - float(_loss(-sigma, sigma, q)))
    panels = max(1, min(64, math.ceil(64 * h / max(bulk, 1e-300)), 4_000_000 // cells))
    # CDF at every half panel, as P(Y <= y) below the median and P(Y > y) above it:
    # each small difference then comes from a small number (no 1 - x cancellation).
    points = j_lo * h + np.arange(2 * panels * cells + 1, dtype=np.float64) * (h / (2 * panels))
    median = _median(sigma, q, direction)
    upper = points > median
    g = _tail_probability(points, sigma, q, direction, upper)
    cdf_like = np.where(upper, -g, g)  # increasing in y on each side of the median
    split = int(np.searchsorted(points, median, side="right"))  # first upper point
    steps = np.diff(cdf_like)
    if 0 < split < points.size:  # the step across the median: P(a < Y <= b) directly
        steps[split - 1] = 1.0 - g[split - 1] - g[split]
    steps = np.maximum(steps, 0.0)
    f_first = float(g[0]) if not upper[0] else 1.0 - float(g[0])
    s_last = float(g[-1]) if upper[-1] else 1.0 - float(g[-1])
    # Split each cell's mass between its ends so that the mean is kept: the right end
    # gets E[(Y - a) / h; a < Y <= b] = F(b) - F(a) - (1/h) int_a^b (F(u) - F(a)) du.
    rise = np.zeros((cells, 2 * panels + 1))  # F(point) - F(a) within each cell
    np.cumsum(steps.reshape(cells, 2 * panels), axis=1, out=rise[:, 1:])
    simpson = np.ones(2 * panels + 1)
    simpson[1::2], simpson[2:-1:2] = 4.0, 2.0
    mass = rise[:, -1]
    right = np.clip(mass - rise @ (simpson / (6 * panels)), 0.0, mass)
    left = mass - right
    nodes = (j_lo + np.arange(cells + 1, dtype=np.float64)) * h
    pmf = np.zeros(nodes.size)
    pmf[:-1] += left
    pmf[1:] += right
    # Clipped tails become atoms at the ends of the grid.
    below, above = f_first, s_last
    pmf[0] += below
    pmf[-1] += above
    pmf.setflags(write=False)
    mean = float(pmf @ nodes)
    return DiscreteLoss(offset=j_lo, pmf=pmf, h=h, clipped=below + above, mean=mean)


# ----------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------
_LAMBDAS = np.array([2.0 ** (k / 2) for k in range(-8, 25)])
_LAMBDAS = np.concatenate([_LAMBDAS, -_LAMBDAS])


@dataclass(frozen=True)
class DeltaCurve:
    """delta(epsilon) of a composed discrete loss, ready to be inverted."""

    offset: int
    h: float
    tail_mass: np.ndarray  # A_k = sum_{j > k} m_j
    tail_weighted: np.ndarray  # C_k = sum_{j > k} m_j exp(-(j - k) h)
    neg_delta: np.ndarray  # -delta at the nodes, -(A_k - C_k): non-decreasing
    noise: float  # bound on the floating-point error of any delta read off this curve

    def epsilon(self, delta: float) -> float:
        """The smallest epsilon (possibly negative) with delta(epsilon) <= delta."""
        k = int(np.searchsorted(self.neg_delta, -delta, side="left"))  # first d_k <= delta
        if k == 0:
            return self.offset * self.h
        a, c = self.tail_mass[k - 1], self.tail_weighted[k - 1]
        s = math.log((a - delta) / c) if c > 0 and a > delta else self.h
        return (self.offset + k - 1) * self.h + min(max(s, 0.0), self.h)


def compose(
    steps: list[tuple[DiscreteLoss, int]],
    h: float,
    window: tuple[float, float],
    floor: float = -math.inf,
) -> DeltaCurve:
    """The delta curve, for epsilon >= ``floor``, of the sum of independent discrete
    losses (``count`` copies of each): FFT composition on a circular grid covering
    ``window``."""
    lo_idx = math.floor(window[0] / h)
    n = scipy.fft.next_fast_len(math.ceil(window[1] / h) - lo_idx + 2, real=True)
    spectrum = np.ones(n // 2 + 1, dtype=np.complex128)
    alive = np.ones(spectrum.size, dtype=bool)
    # relative float error of each component: exp(count * log(phi)) multiplies the
    # error of log(phi) (~eps |log phi|) by count; every other operation adds ~eps.
    eps64 = float(np.finfo(np.float64).eps)
    relative_error = np.full(spectrum.size, 10 * eps64 * math.log2(n))
    shift = 0  # total of the per-step centring shifts, in grid points
    for loss, count in steps:
        centre = round(loss.mean / h)  # centring keeps the phases small
        idx = (loss.offset - centre + np.arange(loss.pmf.size)) % n
        phi = scipy.fft.rfft(np.bincount(idx, weights=loss.pmf, minlength=n))
        # |phi|^count underflows to nothing at all but the lowest frequencies of a long
        # composition; only raise the components that can still matter (> e^-80).
        with np.errstate(divide="ignore"):
            log_abs = 0.5 * count * np.log(phi.real**2 + phi.imag**2)
        alive &= log_abs > -80.0
        log_phi = np.log(phi[alive])
        spectrum[alive] *= np.exp(count * log_phi) if count > 1 else phi[alive]
        relative_error[alive] += eps64 * (count * np.abs(log_phi) + 10.0)
        shift += count * centre
    spectrum[~alive] = 0.0
    spectrum[0] = 1.0  # the total mass is exactly one: do not carry its float error
    out = scipy.fft.irfft(spectrum, n)
    # An error e_f in component f moves every entry by at most (2/n) sum_f |X_f| e_f,
    # and delta by that once per grid point above epsilon: it becomes part of the slack
    # (and is why a very small delta cannot be resolved on a large grid). The dropped
    # components (|X_f| < e^-80) add less than 1e-34 per entry.
    per_point = (2.0 / n) * float(np.abs(spectrum) @ relative_error) + 1e-34
    # out[i] is the mass of value index v = i + shift (mod n); lay it out from lo_idx.
    pmf = np.roll(out, -((lo_idx - shift) % n))
    start = min(max(0, math.ceil(floor / h) - lo_idx), n - 1) if math.isfinite(floor) else 0
    pmf = np.maximum(pmf[start:], 0.0)
    rev = pmf[::-1]
    # A_k and C_k (sums over j > k)
    tail_mass = np.concatenate([np.cumsum(rev)[::-1][1:], [0.0]])
    decay = math.exp(-h)
    d_incl = lfilter([1.0], [1.0, -decay], rev)[::-1]  # D_k = sum_{j >= k} m_j e^{-(j-k)h}
    tail_weighted = np.concatenate([decay * d_incl[1:], [0.0]])
    return DeltaCurve(
        offset=lo_idx + start,
        h=h,
        tail_mass=tail_mass,
        tail_weighted=tail_weighted,
        neg_delta=tail_weighted - tail_mass,
        noise=per_point * pmf.size,
    )


def _window(steps: list[tuple[DiscreteLoss, int]], log_inv_p: float) -> tuple[float, float]:
    """[lo, hi] holding the composed loss except with probability <= 2 p (Chernoff)."""
    total = np.zeros(_LAMBDAS.size)
    for loss, count in steps:
        total += count * loss.log_mgf(_LAMBDAS)
    bound = (total + log_inv_p) / _LAMBDAS
    pos = _LAMBDAS > 0
    return float(np.max(bound[~pos])), float(np.min(bound[pos]))


# ----------------------------------------------------------------------------------------
# The accountant
# ----------------------------------------------------------------------------------------
class PRVOptions(BaseModel):
    """Options of the ``prv`` accountant."""

    model_config = ConfigDict(extra="forbid")

    eps_error: float = Field(
        default=0.01, gt=0, le=1, description="target gap between the estimate and each bound"
    )
    delta_error: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="probability slack of the bounds; default delta / 1000",
    )
    max_grid: int = Field(
        default=1 << 21,
        ge=1 << 12,
        description="most grid points; beyond, the mesh grows and the error bound with it",
    )


class PRVAccountant(HistoryAccountant):
    """Privacy random variables composed by FFT: near-exact epsilon with certified bounds."""

    name = "prv"

    def __init__(
        self, eps_error: float = 0.01, delta_error: float | None = None, max_grid: int = 1 << 21
    ) -> None:
        super().__init__()
        if not eps_error > 0:
            raise AccountingError(f"eps_error must be positive, got {eps_error!r}")
        self.eps_error = float(eps_error)
        self.delta_error = delta_error
        self.max_grid = int(max_grid)
        self._cache: tuple[tuple, list[tuple[DeltaCurve, float]]] | None = None

    def get_epsilon(self, delta: float) -> float:
        """A certified upper bound on epsilon (:meth:`get_epsilon_bounds` ``.upper``)."""
        return self.get_epsilon_bounds(delta).upper

    def get_epsilon_bounds(self, delta: float) -> EpsilonBounds:
        delta = check_delta(delta)
        delta_error = self.delta_error if self.delta_error is not None else delta / 1000
        if not delta_error < delta / 2:
            raise AccountingError(
                f"delta_error ({delta_error}) must be below delta / 2 ({delta / 2}); "
                "lower the prv accountant's delta_error"
            )
        events = self.events()
        if not events:
            return EpsilonBounds(0.0, 0.0, 0.0)
        if any(sigma == 0 for sigma, _ in events):
            return EpsilonBounds(math.inf, math.inf, math.inf)
        # delta(epsilon) is the larger of the two directions', so epsilon(delta) is too.
        curves = self._curves(events, delta_error)
        slack = delta_error + max(c.noise for c, _ in curves)
        if not slack < delta / 2:
            raise AccountingError(
                f"delta={delta} is too small for the prv accountant's float64 precision "
                f"on this grid (numerical error ~{slack:.1e} in delta); use a larger delta, "
                "a larger eps_error (a smaller grid), or the rdp accountant"
            )
        return EpsilonBounds(
            lower=max(0.0, *(c.epsilon(delta + slack) - t for c, t in curves)),
            estimate=max(0.0, *(c.epsilon(delta) for c, _ in curves)),
            upper=max(0.0, *(c.epsilon(delta - slack) + t for c, t in curves)),
        )

    def _curves(
        self, events: dict[tuple[float, float], int], delta_error: float
    ) -> list[tuple[DeltaCurve, float]]:
        """Per neighbouring direction: its delta curve and its epsilon error t."""
        key = (tuple(sorted(events.items())), delta_error, self.eps_error, self.max_grid)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        total = sum(events.values())
        # Round the step count up to a power of 2^(1/8) so the discretised steps are
        # cached across nearby step counts (a finer mesh than needed is still valid).
        t_mesh = 2.0 ** (math.ceil(8 * math.log2(total)) / 8) if total > 1 else 1.0
        # Slack budget: rounding delta_error/2, clipping delta_error/4, wrap-around /4.
        log_inv_rounding = math.log(2 / delta_error)
        tau = delta_error / (8 * t_mesh)
        log_inv_wrap = math.log(8 / delta_error)
        h0 = self.eps_error / math.sqrt(t_mesh * log_inv_rounding / 2)

        def curve(direction: Direction) -> tuple[DeltaCurve, float]:
            h = h0
            for _ in range(60):
                steps = [
                    (discretise(sigma, q, direction, h, tau), count)
                    for (sigma, q), count in events.items()
                ]
                lo, hi = _window(steps, log_inv_wrap)
                points = (hi - lo) / h
                if points <= self.max_grid:
                    break
                h *= 1.05 * points / self.max_grid  # coarser mesh, larger (reported) error
            else:  # pragma: no cover - the window shrinks as h grows
                raise AccountingError("could not fit the composed privacy loss on the grid")
            t = h * math.sqrt(total * log_inv_rounding / 2)
            # epsilon below -t - 1 is reported as 0 anyway: skip that part of the curve
            return compose(steps, h, (lo, hi), floor=-t - 1.0), t

        # The two directions are independent and numpy/scipy release the GIL: use both
        # cores when they are free.
        curves = list(_executor().map(curve, ("remove", "add")))
        self._cache = (key, curves)
        return curves


_pool: tuple[int, ThreadPoolExecutor] | None = None


def _executor() -> ThreadPoolExecutor:
    """Two worker threads, per process (a forked child, e.g. a DataLoader worker, must
    not reuse its parent's pool: its threads do not exist there)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=2, thread_name_prefix="dpcore-prv"))
    return _pool[1]
