"""Banded matrix-factorisation (BandMF) noise: strategies, sensitivity and error.

DP-SGD releases noisy gradients ``g_t + z_t``. A matrix-factorisation mechanism
factors the prefix-sum matrix ``A`` (lower-triangular ones) as ``A = B C`` and
releases ``g + C^{-1} z`` instead: the noise ``x = C^{-1} z`` is correlated
across steps so that much of it cancels in the running sums the model
parameters are made of. With ``C`` lower-triangular, Toeplitz and ``b``-banded
(coefficients ``c_0 .. c_{b-1}``) the noise can be generated as a stream,

    x_t = (z_t - sum_{j=1}^{b-1} c_j x_{t-j}) / c_0,

keeping only the last ``b - 1`` noise tensors. ``b = 1`` is DP-SGD.

Privacy: if every example participates in steps at least ``b`` apart (cyclic
Poisson sampling with ``k >= b`` groups) and every column of ``C`` has norm at
most 1, BandMF over ``n`` steps is exactly as private as DP-SGD with
``ceil(n / k)`` steps at the per-group sampling rate (Choquette-Choo et al.,
NeurIPS 2023). The coefficients are therefore always column-normalised here.

This module is plain math (numpy/scipy, plus one torch helper for the stream);
the ``bandmf`` noise plugin and the ``cyclic_poisson`` sampler build on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.signal import lfilter

from .errors import ConfigError

Coefs = Literal["sqrt", "optimized"] | Sequence[float]

#: Horizon the "optimized" strategy is tuned for when none is given.
DEFAULT_HORIZON = 1000


# ----------------------------------------------------------------------------------------
# Strategies (coefficients of a banded Toeplitz C)
# ----------------------------------------------------------------------------------------
def normalize_coefficients(coefs: Sequence[float] | np.ndarray) -> np.ndarray:
    """Scale ``coefs`` so a full column of ``C`` has L2 norm 1 (float64).

    The accounting assumes column norms of at most 1, so every strategy goes
    through here; ``c_0`` must be positive (``C`` has to be invertible, and the
    sign convention keeps the stream's first step ``z_0 / c_0``).
    """
    c = np.asarray(coefs, dtype=np.float64).reshape(-1)
    if c.size == 0:
        raise ConfigError("BandMF needs at least one coefficient (bands >= 1)")
    if not np.all(np.isfinite(c)):
        raise ConfigError(f"BandMF coefficients must be finite, got {c.tolist()}")
    if c[0] <= 0:
        raise ConfigError(
            f"the first BandMF coefficient c_0 must be positive (C must be invertible), got {c[0]}"
        )
    return c / np.linalg.norm(c)


def sqrt_coefficients(bands: int) -> np.ndarray:
    """The banded square root strategy, column-normalised.

    ``c_k = prod_{j=1}^{k} (2j - 1) / (2j)`` are the Taylor coefficients of
    ``(1 - x)^{-1/2}``, i.e. the first column of the square root of the
    prefix-sum matrix; truncated to ``bands`` terms.
    """
    _check_bands(bands)
    c = np.ones(bands)
    for k in range(1, bands):
        c[k] = c[k - 1] * (2 * k - 1) / (2 * k)
    return normalize_coefficients(c)


def optimized_coefficients(bands: int, steps: int = DEFAULT_HORIZON) -> np.ndarray:
    """Banded Toeplitz strategy minimising prefix-sum error x sensitivity squared.

    L-BFGS in float64 over ``c_1 .. c_{b-1}`` (``c_0 = 1``; the objective is
    scale-free), started from the square root strategy, with the exact gradient.
    With at least ``b`` steps between participations the sensitivity squared is
    (number of participations) x (squared norm of a full column), so the objective
    is ``||A C^{-1}||_F^2 * ||c||^2``. Cached per ``(bands, steps)``.
    """
    _check_bands(bands)
    if steps < 1:
        raise ConfigError(f"the horizon of the optimized strategy must be >= 1, got {steps}")
    return _optimized(int(bands), int(steps)).copy()


@lru_cache(maxsize=64)
def _optimized(bands: int, steps: int) -> np.ndarray:
    start = sqrt_coefficients(bands)
    if bands == 1:
        return start
    scale = steps * (steps + 1) / 2  # ||A||_F^2: keeps the objective near 1

    def objective(free: np.ndarray) -> tuple[float, np.ndarray]:
        c = np.concatenate([[1.0], free])
        err, grad = _prefix_error_and_grad(c, steps)
        norm2 = float(c @ c)
        value = err * norm2 / scale
        if not np.isfinite(value):  # an unstable (non-minimum-phase) C: steer away
            return 1e30, -free
        g = (grad * norm2 + 2.0 * err * c) / scale
        return value, g[1:]

    result = minimize(
        objective,
        start[1:] / start[0],
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10},
    )
    best = np.concatenate([[1.0], result.x])
    if objective(result.x)[0] > objective(start[1:] / start[0])[0]:  # never worse than sqrt
        best = start
    return normalize_coefficients(best)


def resolve_coefficients(
    bands: int | None, coefs: Coefs = "sqrt", *, horizon: int = DEFAULT_HORIZON
) -> np.ndarray:
    """Column-normalised coefficients from a plugin-style choice.

    ``coefs`` is ``"sqrt"``, ``"optimized"`` (tuned for ``horizon`` steps) or an
    explicit list (its length is the number of bands; ``bands``, if given, must
    agree).
    """
    if isinstance(coefs, str):
        if bands is None:
            raise ConfigError(
                f"BandMF with coefs={coefs!r} needs the number of bands: set `bands` "
                "(`dpcore noise --choose-bands` suggests one for your budget)"
            )
        if coefs == "sqrt":
            return sqrt_coefficients(bands)
        if coefs == "optimized":
            return optimized_coefficients(bands, horizon)
        raise ConfigError(f"unknown BandMF strategy {coefs!r}; use 'sqrt', 'optimized' or a list")
    c = normalize_coefficients(list(coefs))
    if bands is not None and bands != c.size:
        raise ConfigError(
            f"bands = {bands} but {c.size} coefficients were given; drop `bands` or make them agree"
        )
    return c


def _check_bands(bands: int) -> None:
    if int(bands) != bands or bands < 1:
        raise ConfigError(f"bands must be a positive integer, got {bands!r}")


# ----------------------------------------------------------------------------------------
# Matrices and error
# ----------------------------------------------------------------------------------------
def strategy_matrix(coefs: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """Dense ``n x n`` lower-triangular banded Toeplitz ``C`` with ``C[i, i-k] = c_k``."""
    c = np.asarray(coefs, dtype=np.float64)
    C = np.zeros((n, n))
    for k in range(min(c.size, n)):
        C += np.diag(np.full(n - k, c[k]), -k)
    return C


def inverse_coefficients(coefs: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """First column of ``C^{-1}`` (also Toeplitz): the power series ``1 / c(x)`` to ``n`` terms."""
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return lfilter([1.0], np.asarray(coefs, dtype=np.float64), impulse)


def prefix_error(coefs: Sequence[float] | np.ndarray, n: int) -> float:
    """``||A C^{-1}||_F^2``: total squared error of the ``n`` noisy prefix sums per unit
    noise variance and coordinate."""
    return _prefix_error_and_grad(np.asarray(coefs, dtype=np.float64), n, grad=False)[0]


def _prefix_error_and_grad(c: np.ndarray, n: int, *, grad: bool = True) -> tuple[float, np.ndarray]:
    # A C^{-1} is Toeplitz with first column e = cumsum(d), d = series of 1/c(x); entry e_k
    # appears n - k times, so the error is sum_k (n - k) e_k^2.
    with np.errstate(over="ignore", invalid="ignore"):
        d = inverse_coefficients(c, n)
        e = np.cumsum(d)
        w = np.arange(n, 0, -1, dtype=np.float64)
        err = float(np.sum(w * e * e))
        if not grad:
            return err, np.empty(0)
        # dL/dd_m = sum_{k >= m} 2 w_k e_k ; dd/dc_j = -(d * d) shifted by j
        g = np.cumsum((2.0 * w * e)[::-1])[::-1]
        dd = np.convolve(d, d)[:n]
        jac = np.array([-float(g[j:] @ dd[: n - j]) for j in range(c.size)])
    return err, jac


def mean_squared_prefix_error(coefs: Sequence[float] | np.ndarray, n: int) -> float:
    """Mean over steps of the prefix-sum noise variance, per unit noise variance."""
    return prefix_error(coefs, n) / n


def expected_prefix_rmse(
    coefs: Sequence[float] | np.ndarray, n: int, noise_std: float = 1.0
) -> float:
    """Expected RMSE (over steps and coordinates) of the noise in the ``n`` prefix sums
    when ``z_t ~ N(0, noise_std^2)``: ``noise_std * sqrt(||A C^{-1}||_F^2 / n)``."""
    return noise_std * math.sqrt(mean_squared_prefix_error(coefs, n))


# ----------------------------------------------------------------------------------------
# Sensitivity
# ----------------------------------------------------------------------------------------
def sensitivity(C: np.ndarray, min_separation: int, max_participations: int | None = None) -> float:
    """L2 sensitivity of ``C g`` when one example's (clipped, norm <= 1) gradient enters
    at steps that are at least ``min_separation`` apart (at most ``max_participations``).

    The worst case over participation patterns ``P`` and gradient directions is
    bounded by ``sqrt(sum_{i, j in P} |G_ij|)`` with ``G = C^T C``, and equals it when
    ``G >= 0`` (e.g. non-negative coefficients): the gradients then all point the
    same way and the value is ``||C 1_P||``. Exact dynamic programme over steps whose
    state is the set of chosen steps within the band of ``G``; cheap when the
    separation is at least the band (then at most one step is in the window).
    """
    C = np.asarray(C, dtype=np.float64)
    n = C.shape[1]
    if min_separation < 1:
        raise ValueError(f"min_separation must be >= 1, got {min_separation}")
    G = np.abs(C.T @ C)
    offdiag = [k for k in range(1, n) if np.any(np.diagonal(G, k) != 0)]
    band = max(offdiag, default=0)  # G_ij = 0 for |i - j| > band
    window = max(band, min_separation - 1)
    cap = n if max_participations is None else max_participations
    # state: (chosen steps within the last `window` steps, as a sorted tuple; count) -> best
    states: dict[tuple[tuple[int, ...], int], float] = {((), 0): 0.0}
    for t in range(n):
        nxt: dict[tuple[tuple[int, ...], int], float] = {}
        for (chosen, count), value in states.items():
            kept = tuple(s for s in chosen if s >= t - window)
            moves = [((kept, count), value)]  # t not chosen
            if count < cap and (not kept or t - kept[-1] >= min_separation):
                gain = G[t, t] + 2.0 * sum(G[t, s] for s in kept if t - s <= band)
                moves.append((((*kept, t), count + 1), value + gain))
            for key, total in moves:
                if total > nxt.get(key, -1.0):
                    nxt[key] = total
        states = nxt
    return math.sqrt(max(states.values()))


# ----------------------------------------------------------------------------------------
# The stream
# ----------------------------------------------------------------------------------------
def banded_step(
    z: torch.Tensor, history: Sequence[torch.Tensor], coefs: Sequence[float]
) -> torch.Tensor:
    """One step of ``x = C^{-1} z``: ``(z_t - sum_j c_j x_{t-j}) / c_0``.

    ``history[j - 1]`` is ``x_{t-j}`` (newest first; shorter at the start of the
    stream). Works in the dtype of ``z`` (float64 in tests); returns a new tensor.
    With one band and ``c_0 = 1`` it returns ``z`` unchanged (bit for bit), which
    makes ``bandmf`` with ``bands = 1`` identical to ``gaussian``.
    """
    x = z.clone()
    for c_j, past in zip(coefs[1:], history, strict=False):
        x.sub_(past, alpha=float(c_j))
    if coefs[0] != 1.0:
        x.div_(float(coefs[0]))
    return x


# ----------------------------------------------------------------------------------------
# Choosing the number of bands for a budget
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BandsCandidate:
    """One row of :func:`choose_bands`' table."""

    bands: int
    sample_rate: float  # per-group Poisson rate p = B b / N
    accounted_steps: int  # ceil(n / b) DP-SGD events
    noise_multiplier: float
    prefix_rmse: float  # expected RMSE of the prefix-sum noise, in units of the clip norm
    relative_error: float  # prefix_rmse / DP-SGD's (b = 1)


@dataclass(frozen=True)
class BandsChoice:
    candidates: list[BandsCandidate]
    best: BandsCandidate


def default_band_candidates(max_bands: int) -> list[int]:
    """Powers of two up to ``max_bands``."""
    out, b = [], 1
    while b <= max_bands:
        out.append(b)
        b *= 2
    return out


def choose_bands(
    target_epsilon: float,
    delta: float,
    num_samples: int,
    batch_size: int,
    steps: int,
    **options: Any,
) -> BandsChoice:
    """The expected prefix-sum error of BandMF for each number of bands, and the best.

    For ``b`` bands with cyclic Poisson sampling (``b`` groups, rate
    ``p = B b / N``), the noise multiplier is calibrated so that DP-SGD with
    ``ceil(steps / b)`` steps at rate ``p`` spends ``target_epsilon``; the error is
    that multiplier times the strategy's prefix RMSE. ``relative_error`` compares
    with DP-SGD (``b = 1``), which is always a candidate. Candidates need
    ``p <= 1`` and ``b <= steps``. Options: see :func:`choose_bands_for_rate`.
    """
    if batch_size < 1 or num_samples < batch_size:
        raise ConfigError(
            f"need 1 <= batch_size <= num_samples, got batch_size={batch_size}, "
            f"num_samples={num_samples}"
        )
    return choose_bands_for_rate(target_epsilon, delta, batch_size / num_samples, steps, **options)


def choose_bands_for_rate(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    candidates: Sequence[int] | None = None,
    coefs: Literal["sqrt", "optimized"] = "sqrt",
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
    accountant_options: Mapping[str, Any] | None = None,
    noise_multiplier_fn: Callable[..., float] | None = None,
) -> BandsChoice:
    """:func:`choose_bands` given the sample rate ``q = B / N`` (``b <= 1 / q``).

    ``candidates`` defaults to the powers of two; ``noise_multiplier_fn`` defaults to
    :func:`dpcore.accounting.get_noise_multiplier` with ``accountant``.
    """
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if noise_multiplier_fn is None:
        from .accounting import get_noise_multiplier

        noise_multiplier_fn = get_noise_multiplier
    max_bands = min(steps, math.floor(1 / sample_rate + 1e-9))
    wanted = default_band_candidates(max_bands) if candidates is None else list(candidates)
    bands_list = sorted({1, *(int(b) for b in wanted if 1 <= b <= max_bands)})
    rows = []
    for b in bands_list:
        rate = min(1.0, sample_rate * b)
        events = math.ceil(steps / b)
        sigma = float(
            noise_multiplier_fn(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=rate,
                steps=events,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
                **dict(accountant_options or {}),
            )
        )
        c = resolve_coefficients(b, coefs, horizon=steps)
        rows.append((b, rate, events, sigma, expected_prefix_rmse(c, steps, sigma)))
    base = rows[0][4]
    table = [
        BandsCandidate(b, rate, events, sigma, rmse, rmse / base)
        for b, rate, events, sigma, rmse in rows
    ]
    return BandsChoice(table, min(table, key=lambda r: r.prefix_rmse))
