"""Estimators of dpcore.audit: p-values, bounds, selection rules and calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, special, stats

from dpcore.audit import estimators as E


def naive_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The one-run p-value written as a plain loop over i, straight from the formula."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(x: int) -> float:  # P[Binomial(r, q) >= x]
        return float(stats.binom.sf(x - 1, r, q))

    fv = f(v)
    best = 0.0
    for i in range(1, v + 1):
        best = max(best, (f(v - i) - fv) / i)
    return min(1.0, fv + 2 * m * delta * best)


@pytest.mark.parametrize("m", [10, 100, 1000])
@pytest.mark.parametrize("delta", [0.0, 1e-6, 1e-3, 0.1])
def test_vectorised_p_value_matches_naive_loop(m: int, delta: float) -> None:
    rng = np.random.default_rng(m)
    cases = {(1, 1), (m // 2, m // 2), (m, m), (m, (3 * m) // 4)}
    for _ in range(3):
        r = int(rng.integers(1, min(m, 120) + 1))
        cases.add((r, int(rng.integers(0, r + 1))))
    for r, v in sorted(cases):
        if r > 200:  # the naive reference is quadratic in python
            continue
        for eps in (0.0, 0.5, 1.0, 3.0):
            got = E.one_run_p_value(m, r, v, eps, delta)
            want = naive_p_value(m, r, v, eps, delta)
            assert got == pytest.approx(want, rel=1e-8, abs=1e-12), (m, r, v, eps, delta)


def test_p_value_vectorised_over_eps() -> None:
    eps = np.array([0.0, 0.3, 1.0, 2.0])
    got = E.one_run_p_value(100, 40, 35, eps, 1e-4)
    assert np.shape(got) == (4,)
    for e, p in zip(eps, got, strict=True):
        assert p == pytest.approx(naive_p_value(100, 40, 35, float(e), 1e-4), rel=1e-9)


def test_bound_is_where_p_value_crosses_alpha() -> None:
    m, r, v, alpha, delta = 1000, 200, 170, 0.05, 1e-5
    eps = E.one_run_epsilon(m, r, v, alpha, delta)
    assert 0 < eps < math.log(v / (r - v))
    assert E.one_run_p_value(m, r, v, eps, delta) <= alpha
    assert E.one_run_p_value(m, r, v, eps + 1e-6, delta) > alpha


def deterministic_normal(mu: float, n: int) -> np.ndarray:
    return stats.norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + mu


# jax-privacy's test values (canary_score_auditor_test.py, test_epsilon_one_run_close)
@pytest.mark.parametrize(
    ("shift", "expected", "fdp"),
    [
        (1, 1.13346, False),
        (2, 2.311945, False),
        (4, 4.395568, False),
        (1, 2.164749, True),
        (2, 4.7218075, True),
        (4, 9.133752, True),
    ],
)
def test_reproduces_jax_privacy_published_values(shift: float, expected: float, fdp: bool) -> None:
    n = 10_000
    out_scores = deterministic_normal(0, n)
    in_scores = deterministic_normal(shift, n)
    bound = E.roc_hull_bound(in_scores, out_scores, alpha=0.05, delta=1e-6, fdp=fdp)
    assert bound.epsilon == pytest.approx(expected, rel=1e-4)
    if fdp:
        assert bound.mu is not None and bound.mu > 0


def test_roc_hull_keeps_only_strict_vertices() -> None:
    # in-scores above all out-scores: hull is (0,0) -> (0, n_in) -> (n_out, n_in)
    _, tp, fp = E.roc_hull_counts(np.array([5.0, 6, 7]), np.array([1.0, 2, 3, 4]))
    assert list(zip(fp.tolist(), tp.tolist(), strict=True)) == [(0, 0), (0, 3), (4, 3)]
    # indistinguishable scores: a straight diagonal, only the endpoints remain
    _, tp, fp = E.roc_hull_counts(np.zeros(4), np.zeros(4))
    assert list(zip(fp.tolist(), tp.tolist(), strict=True)) == [(0, 0), (4, 4)]


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_perfect_guessing_ceiling(r: int) -> None:
    alpha = 0.05
    closed_form = special.logit(alpha ** (1 / r))
    assert E.perfect_guessing_ceiling(r, r, alpha, 0.0) == pytest.approx(closed_form, rel=1e-8)
    with_delta = E.perfect_guessing_ceiling(r, r, alpha, 1e-5)
    assert with_delta <= closed_form
    assert with_delta == pytest.approx(closed_form, rel=0.05)


def test_ceiling_at_ten_thousand_canaries_is_about_seven() -> None:
    ceiling = E.perfect_guessing_ceiling(10_000, 10_000, 0.05, 1e-5)
    assert 6.5 < ceiling < 8.0


def _vectorised_correct(
    scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int
) -> np.ndarray:
    order = np.argsort(scores, axis=1, kind="stable")
    ranked = np.take_along_axis(included, order, axis=1)
    top = ranked[:, scores.shape[1] - k_plus :].sum(axis=1)
    bottom = (~ranked[:, :k_minus]).sum(axis=1)
    return top + bottom


def _randomized_response_runs(seeds: int, m: int, eps: float, reveal: float, seed: int):
    """m canaries, each in with probability 1/2; the output states each one's bit truly
    with probability e^eps / (1 + e^eps) (eps-DP per canary), or, with probability
    ``reveal``, exactly (which makes it (eps, reveal)-DP)."""
    rng = np.random.default_rng(seed)
    included = rng.random((seeds, m)) < 0.5
    truthful = rng.random((seeds, m)) < special.expit(eps)
    truthful |= rng.random((seeds, m)) < reveal
    said_in = np.where(truthful, included, ~included)
    scores = said_in + 0.5 * rng.random((seeds, m))  # ties broken at random, not by label
    return scores, included


def test_coverage_on_randomized_response() -> None:
    seeds, m, eps, alpha = 1000, 1000, 1.0, 0.05
    scores, included = _randomized_response_runs(seeds, m, eps, 0.0, seed=1)
    k = 250
    correct = _vectorised_correct(scores, included, k, k)
    for s in range(3):  # the vectorised count agrees with the library's
        assert correct[s] == E.count_correct(scores[s], included[s], k, k)
    bounds = E._one_run_epsilon_pure_vec(np.full(seeds, 2 * k), correct, alpha)
    for s in range(3):
        assert bounds[s] == pytest.approx(
            E.one_run_epsilon(m, 2 * k, int(correct[s]), alpha, 0.0), abs=1e-8
        )
    above = float(np.mean(bounds > eps))
    assert above <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / seeds)
    assert above > 0.01  # the bound is tight here: it is not trivially below eps
    assert float(np.median(bounds)) > 0.5 * eps


def test_delta_term_is_needed() -> None:
    seeds, m, eps, alpha, reveal = 1000, 1000, 1.0, 0.05, 0.1
    scores, included = _randomized_response_runs(seeds, m, eps, reveal, seed=2)
    k = m // 2
    correct = _vectorised_correct(scores, included, k, k)
    limit = alpha + 3 * math.sqrt(alpha * (1 - alpha) / seeds)
    # ignoring delta, the (eps, reveal)-DP mechanism fails eps-DP's test far too often
    without = E._one_run_epsilon_pure_vec(np.full(seeds, m), correct, alpha)
    assert float(np.mean(without > eps)) > 3 * limit
    # with the delta term the bound covers eps as promised
    sample = range(0, seeds, 10)
    with_delta = np.array([E.one_run_epsilon(m, m, int(correct[s]), alpha, reveal) for s in sample])
    assert float(np.mean(with_delta > eps)) <= limit


def test_count_correct_uses_both_sides() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.8])
    included = np.array([False, True, True, False, False])
    assert E.count_correct(scores, included, 2, 0) == 1  # 0.9 (in), 0.8 (out)
    assert E.count_correct(scores, included, 0, 2) == 2  # 0.1, 0.2 both out
    assert E.count_correct(scores, included, 1, 1) == 2
    with pytest.raises(ValueError):
        E.count_correct(scores, included, 4, 2)


@pytest.mark.parametrize("selection", ["grid", "split"])
def test_selection_rules_separate_and_stay_below_truth(selection: str) -> None:
    m, delta = 2000, 1e-5
    rng = np.random.default_rng(3)
    included = rng.random(m) < 0.5
    # perfectly separated scores: close to the ceiling
    strong = E.audit_scores(included * 10.0 + rng.random(m), included, selection=selection, seed=1)
    assert strong.epsilon > 4
    assert strong.correct == strong.guesses
    # scores of a 1-GDP mechanism: below its epsilon
    mu = 1.0
    weak = E.audit_scores(rng.normal(size=m) + mu * included, included, selection=selection, seed=1)
    assert 0 <= weak.epsilon <= E.gaussian_epsilon(mu, delta)
    fdp = E.audit_scores(
        rng.normal(size=m) + mu * included, included, selection=selection, fdp=True
    )
    assert fdp.mu is not None and fdp.mu <= mu
    assert fdp.epsilon == pytest.approx(E.gaussian_epsilon(fdp.mu, delta))
    with pytest.raises(ValueError, match="selection"):
        E.audit_scores(np.zeros(4), np.array([1, 0, 1, 0], bool), selection="best")  # type: ignore[arg-type]


def test_fdp_is_tighter_than_one_run_on_gaussian_scores() -> None:
    n = 2000
    out_scores, in_scores = deterministic_normal(0, n), deterministic_normal(2, n)
    plain = E.roc_hull_bound(in_scores, out_scores, alpha=0.05, delta=1e-5)
    fdp = E.roc_hull_bound(in_scores, out_scores, alpha=0.05, delta=1e-5, fdp=True)
    assert fdp.epsilon > 1.2 * plain.epsilon > 0


@pytest.mark.parametrize("mu", [0.2, 1.0, 3.0])
@pytest.mark.parametrize("delta", [1e-6, 1e-3])
def test_gaussian_conversion_against_privacy_loss_integral(mu: float, delta: float) -> None:
    eps = E.gaussian_epsilon(mu, delta)

    # independent derivation: delta(eps) = E[(1 - e^(eps - L))_+], L ~ N(mu^2/2, mu^2)
    def integrand(loss: float) -> float:
        return (1 - math.exp(eps - loss)) * stats.norm.pdf(loss, mu * mu / 2, mu)

    value, _ = integrate.quad(integrand, eps, eps + 40 * mu, epsabs=1e-14, epsrel=1e-10)
    assert value == pytest.approx(delta, rel=1e-5)
    assert E.gaussian_mu(eps, delta) == pytest.approx(mu, rel=1e-8)


def test_calibration_standard_error_matches_spread() -> None:
    rng = np.random.default_rng(4)
    mu, n = 1.0, 2000
    included = np.arange(n) < n // 2
    values, ses = [], []
    for _ in range(300):
        scores = rng.normal(size=n) + mu * included
        cal = E.calibrate(scores, included)
        values.append(cal.mu_hat)
        ses.append(cal.standard_error)
    assert np.mean(values) == pytest.approx(mu, abs=0.01)
    assert np.std(values) == pytest.approx(np.mean(ses), rel=0.15)


def test_expected_mu_closed_form() -> None:
    steps, q, a, s = 100, 0.1, 1.0, 2.0
    assert E.expected_mu(np.full(steps, a), np.full(steps, s), q) == pytest.approx(
        q * math.sqrt(steps) * a / s
    )
    assert E.tolerance(0.1, 1e-3) == pytest.approx(0.329, abs=1e-3)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        E.one_run_epsilon(10, 5, 5, 0.7, 0.0)
    with pytest.raises(ValueError, match="correct"):
        E.one_run_p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="two in"):
        E.calibrate(np.zeros(3), np.array([True, False, False]))


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(2, 3000),
    frac_guess=st.floats(0.01, 1.0),
    frac_correct=st.floats(0.0, 1.0),
    delta=st.sampled_from([0.0, 1e-6, 1e-4]),
)
def test_bound_properties(m: int, frac_guess: float, frac_correct: float, delta: float) -> None:
    r = max(1, round(frac_guess * m))
    v = round(frac_correct * r)
    eps = E.one_run_epsilon(m, r, v, 0.05, delta)
    assert eps >= 0
    if eps > 0:  # the bound is rejected at its own level, and is below the empirical log-odds
        assert E.one_run_p_value(m, r, v, eps, delta) <= 0.05
        assert v == r or eps < math.log(v / (r - v))
    if v < r:  # one more correct guess never lowers the bound
        assert E.one_run_epsilon(m, r, v + 1, 0.05, delta) >= eps - 1e-9
    if delta > 0:  # delta only makes the test harder to fail
        assert eps <= E.one_run_epsilon(m, r, v, 0.05, 0.0) + 1e-9
