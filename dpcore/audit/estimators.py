"""Estimators of a privacy audit: from canary scores to a lower bound on epsilon.

Pure numpy/scipy (no torch), so the statistics can be used on scores from any source.

One-run auditing (Steinke, Nasr and Jagielski, NeurIPS 2023, arXiv:2305.08846): ``m``
canaries are each included independently with probability 1/2, the model is trained
once, and every canary gets a score. The auditor guesses "in" for the ``k_plus``
highest scores and "out" for the ``k_minus`` lowest; with ``r = k_plus + k_minus``
guesses of which ``v`` are correct, ``q = e^eps / (1 + e^eps)`` and
``f(x) = P[Binomial(r, q) >= x]``, the p-value of the hypothesis "the run is
(eps, delta)-DP" is::

    f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i

and the lower bound is the largest eps whose p-value is at most ``alpha``.

The f-DP variant (Mahloujifar, Melis and Chaudhuri, ICML 2025, arXiv:2410.22235)
tests the whole Gaussian trade-off curve ``G_mu`` instead of one (eps, delta) pair; the
largest rejected ``mu`` is reported, and converted to the epsilon that ``mu``-GDP
spends at ``delta``.

Choosing the number of guesses by looking at the same scores would invalidate the
confidence level, so :func:`audit_scores` offers three selection rules:

``"grid"``
    a small grid of guess counts fixed before looking at the scores, with a
    Bonferroni correction over the grid;
``"split"``
    choose the guess counts on a random half of the canaries, evaluate them on the
    other half;
``"roc_hull"``
    jax-privacy's rule (one-sided guesses, every threshold on the ROC convex hull,
    Bonferroni over the hull's size); kept to compare with its published values.
    The hull, and so the correction, depends on the data: prefer the other rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import special, stats

Selection = Literal["grid", "split", "roc_hull"]

#: Fractions of the canaries guessed (half "in", half "out") by the ``grid`` rule.
DEFAULT_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
#: Finer fractions tried on the first half by the ``split`` rule (no correction needed).
SPLIT_FRACTIONS: tuple[float, ...] = tuple(float(x) for x in np.geomspace(0.005, 1.0, 24))

_EPS_MAX = 100.0  # beyond this every probability involved underflows
_MU_MAX = 100.0


# ----------------------------------------------------------------------------------------
# one-run (eps, delta) test
# ----------------------------------------------------------------------------------------
def one_run_p_value(
    m: int, guesses: int, correct: int, eps: float | np.ndarray, delta: float
) -> float | np.ndarray:
    """p-value of "(eps, delta)-DP" after ``correct`` of ``guesses`` right, ``m`` canaries.

    Vectorised over ``eps`` (any shape) and over ``i`` in the delta term.
    """
    _check_counts(m, guesses, correct)
    eps_arr = np.asarray(eps, dtype=np.float64)
    q = special.expit(eps_arr)[..., None]
    r, v = guesses, correct
    tail = stats.binom.sf(v - 1, r, q[..., 0])  # f(v) = P[X >= v]
    if delta == 0 or v == 0:
        p = tail
    else:
        # f(v - i) - f(v) = P[v - i <= X <= v - 1]: sums of pmf from v - 1 downwards,
        # which keeps full precision even where f is close to 1.
        js = np.arange(v - 1, -1, -1)  # v-1, v-2, ..., 0  (i = 1 .. v)
        window = np.cumsum(stats.binom.pmf(js, r, q), axis=-1)
        ratio = np.max(window / np.arange(1, v + 1), axis=-1)
        p = tail + 2.0 * m * delta * ratio
    p = np.minimum(p, 1.0)
    return float(p) if np.ndim(p) == 0 else p


def one_run_epsilon(
    m: int, guesses: int, correct: int, alpha: float, delta: float, *, tol: float = 1e-10
) -> float:
    """Largest eps whose one-run p-value is at most ``alpha`` (0 if none), by bisection."""
    _check_level(alpha, delta)
    _check_counts(m, guesses, correct)
    if correct == 0 or one_run_p_value(m, guesses, correct, 0.0, delta) > alpha:
        return 0.0
    # With delta = 0 the p-value at the empirical log-odds is about 1/2 > alpha, and the
    # delta term only adds; without wrong guesses search upwards.
    if correct < guesses:
        hi = math.log(correct / (guesses - correct))
    else:
        hi = 1.0
        while hi < _EPS_MAX and one_run_p_value(m, guesses, correct, hi, delta) <= alpha:
            hi *= 2.0
        hi = min(hi, _EPS_MAX)
    lo = 0.0
    while hi - lo > tol * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, guesses, correct, mid, delta) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


def perfect_guessing_ceiling(m: int, guesses: int, alpha: float, delta: float) -> float:
    """The most a one-run audit can certify with ``guesses`` guesses, all correct.

    With ``delta = 0`` this is ``logit(alpha ** (1 / guesses))``; the delta term lowers
    it a little (more for more canaries).
    """
    return one_run_epsilon(m, guesses, guesses, alpha, delta)


def _one_run_epsilon_pure_vec(
    guesses: np.ndarray, correct: np.ndarray, alpha: float, iters: int = 200
) -> np.ndarray:
    """The delta = 0 bound for many (guesses, correct) pairs at once; an upper bound on
    the bound with any delta > 0."""
    r = np.asarray(guesses, dtype=np.float64)
    v = np.asarray(correct, dtype=np.float64)
    ok = (v > 0) & (stats.binom.sf(v - 1, r, 0.5) <= alpha)
    lo = np.zeros_like(r)
    hi = np.where(v < r, np.log(np.maximum(v, 1) / np.maximum(r - v, 1e-300)), _EPS_MAX)
    hi = np.minimum(hi, _EPS_MAX)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = stats.binom.sf(v - 1, r, special.expit(mid)) <= alpha
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
        if np.all(hi - lo <= 1e-10 * np.maximum(1.0, hi)):
            break
    return np.where(ok, lo, 0.0)


# ----------------------------------------------------------------------------------------
# one-run f-DP test against the Gaussian trade-off curve
# ----------------------------------------------------------------------------------------
def _fdp_rejects(
    mu: float, m: int, guesses: np.ndarray, correct: np.ndarray, alpha: float
) -> np.ndarray:
    """Whether ``correct`` of ``guesses`` right rejects ``mu``-GDP at level ``alpha``.

    The recursion of Mahloujifar, Melis and Chaudhuri (2025, "audit_rh_with_cap"):
    starting from the mass ``alpha`` puts on the observed counts, it walks the number of
    correct guesses down, each time adding the least mass of wrong guesses that the
    trade-off curve ``G_mu`` forces (``h``) and the correct-guess mass that comes with it
    (``r``). If the total exceeds the share of guesses among the canaries, no ``mu``-GDP
    mechanism makes the observation that likely: reject. Vectorised over pairs.
    """
    r_guess = np.asarray(guesses, dtype=np.float64)
    v = np.asarray(correct, dtype=np.int64)
    mass_r = alpha * v / m
    mass_h = alpha * (r_guess - v) / m
    active = v > 0
    i = int(v.max(initial=0)) - 1
    while i >= 0 and active.any():
        idx = np.flatnonzero(active & (v > i))
        if idx.size:
            # smallest wrong-guess mass the trade-off curve allows next to mass_r
            forced = special.ndtr(special.ndtri(mass_r[idx]) - mu)
            h_new = np.maximum(mass_h[idx], forced)
            grew = h_new > mass_h[idx]
            step = i / (r_guess[idx] - i)
            mass_r[idx] = np.where(
                grew, np.minimum(mass_r[idx] + step * (h_new - mass_h[idx]), 1.0), mass_r[idx]
            )
            mass_h[idx] = h_new
            # once h stops growing neither h nor r change again
            active[idx[~grew]] = False
        i -= 1
    return (mass_r + mass_h > r_guess / m) & (v > 0)


def fdp_one_run_mu(m: int, guesses: int, correct: int, alpha: float, *, tol: float = 1e-9) -> float:
    """Largest ``mu`` such that ``mu``-GDP is rejected at level ``alpha`` (0 if none)."""
    return float(_fdp_mu_vec(m, np.array([guesses]), np.array([correct]), alpha, tol=tol)[0])


def _fdp_mu_vec(
    m: int, guesses: np.ndarray, correct: np.ndarray, alpha: float, *, tol: float = 1e-9
) -> np.ndarray:
    guesses = np.asarray(guesses, dtype=np.int64)
    correct = np.asarray(correct, dtype=np.int64)
    lo = np.zeros(guesses.shape, dtype=np.float64)
    alive = _fdp_rejects(0.0, m, guesses, correct, alpha)
    if not alive.any():
        return lo
    hi = np.full(guesses.shape, 1.0)
    grow = alive.copy()
    while grow.any():  # bracket each pair's largest rejected mu
        rej = np.zeros_like(grow)
        rej[grow] = _fdp_rejects_at(hi[grow], m, guesses[grow], correct[grow], alpha)
        lo = np.where(rej, hi, lo)
        hi = np.where(rej, np.minimum(hi * 2.0, _MU_MAX), hi)
        grow = rej & (hi < _MU_MAX) & (lo < _MU_MAX)
    todo = alive.copy()
    while todo.any():
        mid = 0.5 * (lo + hi)
        rej = np.zeros_like(todo)
        rej[todo] = _fdp_rejects_at(mid[todo], m, guesses[todo], correct[todo], alpha)
        lo = np.where(todo & rej, mid, lo)
        hi = np.where(todo & ~rej, mid, hi)
        todo = alive & (hi - lo > tol * np.maximum(1.0, hi))
    return lo


def _fdp_rejects_at(
    mus: np.ndarray, m: int, guesses: np.ndarray, correct: np.ndarray, alpha: float
) -> np.ndarray:
    out = np.empty(mus.shape, dtype=bool)
    for value in np.unique(mus):  # pairs share a mu in the common case
        sel = mus == value
        out[sel] = _fdp_rejects(float(value), m, guesses[sel], correct[sel], alpha)
    return out


def gaussian_delta(mu: float, eps: float) -> float:
    """delta(eps) of ``mu``-GDP (the Gaussian mechanism at sensitivity/sigma = mu)."""
    if mu <= 0:
        return 0.0
    a = stats.norm.cdf(-eps / mu + mu / 2)
    b = math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2)) if eps < 700 else 0.0
    return float(max(a - b, 0.0))


def gaussian_epsilon(mu: float, delta: float, *, tol: float = 1e-12) -> float:
    """Smallest eps such that ``mu``-GDP is (eps, delta)-DP (Balle and Wang 2018)."""
    if mu <= 0 or gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(mu, hi) > delta:
        lo, hi = hi, hi * 2.0
    while hi - lo > tol * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def gaussian_mu(eps: float, delta: float, *, tol: float = 1e-12) -> float:
    """Largest ``mu`` whose GDP guarantee implies (eps, delta)-DP."""
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, eps) <= delta:
        lo, hi = hi, hi * 2.0
    while hi - lo > tol * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, eps) <= delta:
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------------------
# from scores to guesses and bounds
# ----------------------------------------------------------------------------------------
def count_correct(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    k_plus: int,
    k_minus: int,
) -> int:
    """Correct guesses when guessing "in" for the ``k_plus`` highest scores and "out"
    for the ``k_minus`` lowest (ties broken by canary order, never by the labels)."""
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1:
        raise ValueError("scores and included must be 1-D arrays of the same length")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > s.size:
        raise ValueError(f"need 0 <= k_plus + k_minus <= m, got {k_plus} + {k_minus} > {s.size}")
    order = np.argsort(s, kind="stable")
    top = order[s.size - k_plus :] if k_plus else order[:0]
    bottom = order[:k_minus]
    return int(inc[top].sum() + (~inc[bottom]).sum())


@dataclass(frozen=True)
class Bound:
    """One lower bound and the guesses it rests on."""

    epsilon: float
    guesses_in: int
    guesses_out: int
    correct: int
    canaries: int  # canaries the test was run on (half of them for ``split``)
    selection: str
    mu: float | None = None  # f-DP bound only: the rejected GDP parameter

    @property
    def guesses(self) -> int:
        return self.guesses_in + self.guesses_out


def _split_counts(m: int, fraction: float) -> tuple[int, int]:
    r = max(1, min(m, round(fraction * m)))
    return (r + 1) // 2, r // 2


def audit_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    alpha: float = 0.05,
    delta: float = 1e-5,
    selection: Selection = "grid",
    grid: Sequence[float] = DEFAULT_GRID,
    seed: int = 0,
    fdp: bool = False,
) -> Bound:
    """Lower bound on epsilon from canary ``scores`` and their inclusion bits.

    ``fdp=False``: the one-run (eps, delta) bound; ``fdp=True``: the f-DP bound against
    Gaussian trade-off curves, reported as the epsilon of the rejected ``mu`` at
    ``delta`` (``Bound.mu`` holds ``mu``). ``grid`` holds fractions of the canaries
    guessed (half "in", half "out"); ``seed`` drives the ``split`` rule's halves.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    _check_level(alpha, delta)
    if selection == "roc_hull":
        return roc_hull_bound(s[inc], s[~inc], alpha=alpha, delta=delta, fdp=fdp)
    if selection == "grid":
        pairs = sorted({_split_counts(s.size, f) for f in grid})
        return _best_of(s, inc, pairs, alpha / len(pairs), delta, fdp, "grid", s.size)
    if selection == "split":
        rng = np.random.default_rng(seed)
        perm = rng.permutation(s.size)
        first, second = perm[: s.size // 2], perm[s.size // 2 :]
        pairs = sorted({_split_counts(first.size, f) for f in SPLIT_FRACTIONS})
        chosen = _best_of(s[first], inc[first], pairs, alpha, delta, fdp, "split", first.size)
        frac_in = chosen.guesses_in / first.size
        frac_out = chosen.guesses_out / first.size
        k_plus = min(second.size, round(frac_in * second.size))
        k_minus = min(second.size - k_plus, round(frac_out * second.size))
        if k_plus + k_minus == 0:
            k_plus = 1
        return _best_of(
            s[second], inc[second], [(k_plus, k_minus)], alpha, delta, fdp, "split", second.size
        )
    raise ValueError(f"unknown selection rule {selection!r}; use 'grid', 'split' or 'roc_hull'")


def _best_of(
    s: np.ndarray,
    inc: np.ndarray,
    pairs: Sequence[tuple[int, int]],
    level: float,
    delta: float,
    fdp: bool,
    selection: str,
    m: int,
) -> Bound:
    correct = np.array([count_correct(s, inc, kp, km) for kp, km in pairs])
    guesses = np.array([kp + km for kp, km in pairs])
    if fdp:
        mus = _fdp_mu_vec(m, guesses, correct, level)
        best = int(np.argmax(mus))
        mu = float(mus[best])
        eps = gaussian_epsilon(mu, delta)
    else:
        values = [
            one_run_epsilon(m, int(g), int(c), level, delta)
            for g, c in zip(guesses, correct, strict=True)
        ]
        best = int(np.argmax(values))
        eps, mu = values[best], None
    kp, km = pairs[best]
    return Bound(eps, kp, km, int(correct[best]), m, selection, mu)


# ----------------------------------------------------------------------------------------
# jax-privacy's rule: thresholds on the ROC convex hull, Bonferroni over the hull
# ----------------------------------------------------------------------------------------
def roc_hull_counts(
    in_scores: np.ndarray, out_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, true positives, false positives) at the vertices of the ROC convex
    hull, for rules "in iff score >= threshold" (collinear points dropped), from the
    highest threshold (no guesses) down."""
    ins, outs = np.sort(in_scores), np.sort(out_scores)
    thresholds = np.concatenate([np.union1d(ins, outs), [np.inf]])
    tp = ins.size - np.searchsorted(ins, thresholds, side="left")
    fp = outs.size - np.searchsorted(outs, thresholds, side="left")
    # walk from (fp, tp) = (0, 0) (threshold inf) to (n_out, n_in): upper convex hull
    xs, ys = fp[::-1].astype(np.float64), tp[::-1].astype(np.float64)
    hull: list[int] = []
    for k in range(xs.size):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (xs[b] - xs[a]) * (ys[k] - ys[a]) - (ys[b] - ys[a]) * (xs[k] - xs[a])
            if cross >= 0:  # b is on or below the chord a-k: not a strict hull vertex
                hull.pop()
            else:
                break
        hull.append(k)
    order = thresholds.size - 1 - np.array(hull)  # by decreasing threshold: guesses grow
    return thresholds[order], tp[order], fp[order]


def roc_hull_bound(
    in_scores: np.ndarray,
    out_scores: np.ndarray,
    *,
    alpha: float,
    delta: float,
    fdp: bool = False,
) -> Bound:
    """Best bound over the ROC-hull thresholds at level ``alpha / (hull size)``."""
    _, tp, fp = roc_hull_counts(np.asarray(in_scores, float), np.asarray(out_scores, float))
    m = int(np.size(in_scores) + np.size(out_scores))
    level = alpha / tp.size
    guesses, correct = tp + fp, tp
    keep = guesses > 0
    guesses, correct = guesses[keep], correct[keep]
    if fdp:
        mus = _fdp_hull_mu(m, guesses, correct, level)
        best = int(np.argmax(mus))
        mu = float(mus[best])
        return Bound(
            gaussian_epsilon(mu, delta),
            int(guesses[best]),
            0,
            int(correct[best]),
            m,
            "roc_hull",
            mu,
        )
    # delta = 0 bounds for every vertex at once bound the delta > 0 ones from above, so
    # exact bounds are only needed in decreasing order until they cannot win
    upper = _one_run_epsilon_pure_vec(guesses, correct, level)
    best_eps, best = 0.0, 0
    for k in np.argsort(-upper, kind="stable"):
        if upper[k] <= best_eps:
            break
        eps = one_run_epsilon(m, int(guesses[k]), int(correct[k]), level, delta)
        if eps > best_eps:
            best_eps, best = eps, int(k)
    return Bound(best_eps, int(guesses[best]), 0, int(correct[best]), m, "roc_hull")


def _fdp_hull_mu(m: int, guesses: np.ndarray, correct: np.ndarray, level: float) -> np.ndarray:
    """Largest rejected mu over many pairs: one bisection over mu for all of them, dropping
    pairs that stop rejecting (each pair rejects exactly the mu below its own bound)."""
    mus = np.zeros(guesses.shape)
    alive = np.flatnonzero(_fdp_rejects(0.0, m, guesses, correct, level))
    if alive.size == 0:
        return mus
    lo, hi = 0.0, 1.0
    while True:
        rej = _fdp_rejects(hi, m, guesses[alive], correct[alive], level)
        if not rej.any() or hi >= _MU_MAX:
            break
        alive, lo, hi = alive[rej], hi, hi * 2.0
    while hi - lo > 1e-9 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        rej = _fdp_rejects(mid, m, guesses[alive], correct[alive], level)
        if rej.any():
            alive, lo = alive[rej], mid
        else:
            hi = mid
    mus[alive] = lo
    return mus


# ----------------------------------------------------------------------------------------
# Gaussian calibration of the scores
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """``mu_hat = (mean_in - mean_out) / sd_out`` and its standard error."""

    mu_hat: float
    standard_error: float
    canaries_in: int
    canaries_out: int
    #: variance of the in-scores over that of the out-scores
    variance_ratio: float = 1.0

    def standard_error_at(self, mu: float) -> float:
        """The standard error if the true separation were ``mu`` (for a tolerance that
        does not depend on the value under test)."""
        return math.sqrt(
            self.variance_ratio / self.canaries_in
            + 1.0 / self.canaries_out
            + mu * mu / (2.0 * self.canaries_out)
        )


def calibrate(
    scores: np.ndarray | Sequence[float], included: np.ndarray | Sequence[bool]
) -> Calibration:
    """Estimate the Gaussian separation of in- and out-canary scores.

    The standard error is the delta-method one: the mean difference contributes
    ``var_in / (n_in var_out) + 1 / n_out`` and the estimated ``sd_out`` contributes
    ``mu^2 / (2 n_out)`` (Gaussian out-scores).
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    s_in, s_out = s[inc], s[~inc]
    if s_in.size < 2 or s_out.size < 2:
        raise ValueError("calibration needs at least two in- and two out-canaries")
    sd_out = float(np.std(s_out, ddof=1))
    if sd_out == 0:
        gap = float(np.mean(s_in) - np.mean(s_out))
        mu_inf = math.copysign(math.inf, gap) if gap else 0.0
        return Calibration(mu_inf, 0.0, s_in.size, s_out.size, math.inf)
    mu = float((np.mean(s_in) - np.mean(s_out)) / sd_out)
    ratio = float(np.var(s_in, ddof=1)) / sd_out**2
    cal = Calibration(mu, 0.0, s_in.size, s_out.size, ratio)
    return Calibration(mu, cal.standard_error_at(mu), s_in.size, s_out.size, ratio)


def expected_mu(
    contributions: Sequence[float] | np.ndarray,
    noise_stds: Sequence[float] | np.ndarray,
    sample_rate: float,
) -> float:
    """Expected ``mu_hat`` of Dirac canaries scored over a run.

    ``contributions[t]`` is what one included canary adds to its coordinate at step
    ``t`` (after clipping) and ``noise_stds[t]`` the noise std there. An in-canary is
    drawn with probability ``sample_rate`` at each step, so its score exceeds an
    out-canary's by ``sample_rate * sum(contributions)`` on average, while an out-score
    is pure noise with variance ``sum(noise_stds**2)``. Constant values give
    ``q * a * T / (s * sqrt(T)) = q sqrt(T) a / s``.
    """
    a = np.asarray(contributions, dtype=np.float64)
    s = np.asarray(noise_stds, dtype=np.float64)
    if a.shape != s.shape:
        raise ValueError("one contribution and one noise std per step")
    total = float(np.sqrt(np.sum(s * s)))
    if total == 0:
        return math.inf
    return float(sample_rate * a.sum() / total)


def tolerance(standard_error: float, false_alarm: float = 1e-3) -> float:
    """Two-sided acceptance half-width for ``mu_hat`` so that a correct pipeline falls
    outside with probability ``false_alarm``."""
    return float(stats.norm.isf(false_alarm / 2) * standard_error)


# ----------------------------------------------------------------------------------------
def _check_counts(m: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct}, {guesses}, {m}")


def _check_level(alpha: float, delta: float) -> None:
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
