"""Strategies, dense matrices, prefix error and sensitivity of banded Toeplitz C."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.linalg import solve_triangular

from dpcore.correlated import (
    _prefix_error_and_grad,
    banded_step,
    expected_prefix_rmse,
    inverse_coefficients,
    normalize_coefficients,
    optimized_coefficients,
    prefix_error,
    resolve_coefficients,
    sensitivity,
    sqrt_coefficients,
    strategy_matrix,
)
from dpcore.errors import ConfigError


def random_non_increasing(rng: np.random.Generator, bands: int) -> np.ndarray:
    return normalize_coefficients(np.sort(rng.uniform(0.05, 1.0, bands))[::-1])


def prefix_matrix(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n)))


# -- the stream -------------------------------------------------------------------------
@pytest.mark.parametrize("bands", range(1, 9))
def test_stream_equals_dense_solve_in_float64(bands: int) -> None:
    rng = np.random.default_rng(bands)
    n = 64
    for _ in range(3):
        c = random_non_increasing(rng, bands)
        Z = rng.standard_normal((n, 7))
        dense = solve_triangular(strategy_matrix(c, n), Z, lower=True)
        history: list[torch.Tensor] = []
        stream = []
        for t in range(n):
            x = banded_step(torch.from_numpy(Z[t]), history, list(c))
            history = [x, *history][: bands - 1]
            stream.append(x.numpy())
        assert np.max(np.abs(np.array(stream) - dense)) < 1e-10


def test_one_band_returns_input_bit_for_bit() -> None:
    z = torch.randn(5, 3)
    assert torch.equal(banded_step(z, [], [1.0]), z)
    assert list(sqrt_coefficients(1)) == [1.0]


# -- strategies ---------------------------------------------------------------------------
def test_sqrt_strategy_squares_to_prefix_matrix() -> None:
    n = 12
    c = sqrt_coefficients(n) * np.linalg.norm(_raw_sqrt(n))  # undo the normalisation
    C = strategy_matrix(c, n)
    np.testing.assert_allclose(C @ C, prefix_matrix(n), atol=1e-12)


def _raw_sqrt(bands: int) -> np.ndarray:
    return np.array([math.comb(2 * k, k) / 4**k for k in range(bands)])


@pytest.mark.parametrize("bands", [1, 2, 5, 16])
def test_strategies_are_column_normalised(bands: int) -> None:
    for c in (sqrt_coefficients(bands), optimized_coefficients(bands, 50)):
        assert c.size == bands
        assert abs(np.linalg.norm(c) - 1) < 1e-12
        C = strategy_matrix(c, 3 * bands)
        assert np.max(np.linalg.norm(C, axis=0)) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(sqrt_coefficients(bands), normalize_coefficients(_raw_sqrt(bands)))


def test_optimized_strategy_beats_sqrt_by_about_17_percent_at_8_bands_400_steps() -> None:
    n = 400
    gain = 1 - prefix_error(optimized_coefficients(8, n), n) / prefix_error(sqrt_coefficients(8), n)
    assert 0.15 < gain < 0.19


@pytest.mark.parametrize("bands", [2, 4, 16])
def test_optimized_strategy_never_worse_than_sqrt(bands: int) -> None:
    n = 200
    assert prefix_error(optimized_coefficients(bands, n), n) <= prefix_error(
        sqrt_coefficients(bands), n
    ) * (1 + 1e-12)


def test_prefix_error_gradient_matches_finite_differences() -> None:
    c = np.array([1.0, 0.6, 0.3, 0.2])
    n = 40
    _, grad = _prefix_error_and_grad(c, n)
    h = 1e-6
    for j in range(c.size):
        e = np.zeros_like(c)
        e[j] = h
        fd = (prefix_error(c + e, n) - prefix_error(c - e, n)) / (2 * h)
        assert grad[j] == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("bands", [1, 3, 8])
def test_prefix_error_equals_dense_frobenius_norm(bands: int) -> None:
    n = 30
    c = random_non_increasing(np.random.default_rng(0), bands)
    C = strategy_matrix(c, n)
    dense = np.linalg.norm(prefix_matrix(n) @ np.linalg.inv(C)) ** 2
    assert prefix_error(c, n) == pytest.approx(dense, rel=1e-12)
    np.testing.assert_allclose(inverse_coefficients(c, n), np.linalg.inv(C)[:, 0], atol=1e-12)
    assert expected_prefix_rmse(c, n, 2.0) == pytest.approx(2 * math.sqrt(dense / n))
    assert prefix_error([1.0], n) == pytest.approx(n * (n + 1) / 2)


def test_resolve_coefficients_errors_say_what_to_do() -> None:
    with pytest.raises(ConfigError, match="set `bands`"):
        resolve_coefficients(None, "sqrt")
    with pytest.raises(ConfigError, match="agree"):
        resolve_coefficients(3, [1.0, 0.5])
    with pytest.raises(ConfigError, match="positive"):
        resolve_coefficients(None, [-1.0, 0.5])
    with pytest.raises(ConfigError, match="unknown"):
        resolve_coefficients(2, "cholesky")  # type: ignore[arg-type]
    np.testing.assert_allclose(resolve_coefficients(None, [2.0, 1.0]), np.array([2, 1]) / 5**0.5)


# -- sensitivity ------------------------------------------------------------------------------
def patterns(n: int, sep: int, max_k: int | None = None):
    for size in range(1, n + 1):
        if max_k is not None and size > max_k:
            return
        for pattern in itertools.combinations(range(n), size):
            if all(b - a >= sep for a, b in itertools.pairwise(pattern)):
                yield pattern


def brute_force(C: np.ndarray, sep: int, max_k: int | None = None) -> float:
    n = C.shape[1]
    return max(np.linalg.norm(C[:, list(p)].sum(axis=1)) for p in patterns(n, sep, max_k))


@pytest.mark.parametrize("n,bands", [(12, 1), (12, 3), (12, 4), (11, 5), (10, 2), (9, 9)])
def test_sensitivity_equals_brute_force_over_participation_patterns(n: int, bands: int) -> None:
    rng = np.random.default_rng(n * 10 + bands)
    C = strategy_matrix(random_non_increasing(rng, bands), n)
    for sep in range(1, bands + 2):
        for max_k in (None, 2):
            assert sensitivity(C, sep, max_k) == pytest.approx(
                brute_force(C, sep, max_k), rel=1e-12
            )


def test_sensitivity_with_negative_entries_bounds_every_direction() -> None:
    # sum_{i,j in P} |G_ij| is the worst case over gradient signs: brute force over signs too
    n, sep = 8, 2
    C = strategy_matrix(normalize_coefficients([1.0, -0.5, 0.3]), n)
    best = 0.0
    for p in patterns(n, sep):
        for signs in itertools.product((-1.0, 1.0), repeat=len(p)):
            best = max(best, float(np.linalg.norm(C[:, list(p)] @ np.array(signs))))
    assert sensitivity(C, sep) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("n,bands", [(12, 3), (12, 4), (11, 2)])
def test_sensitivity_is_sqrt_participations_iff_separation_reaches_bands(
    n: int, bands: int
) -> None:
    rng = np.random.default_rng(bands)
    C = strategy_matrix(random_non_increasing(rng, bands), n)
    C = C / np.linalg.norm(C, axis=0)  # every column (also the truncated last ones) norm 1
    for sep in range(bands, bands + 3):
        k = math.ceil(n / sep)
        assert brute_force(C, sep) == pytest.approx(math.sqrt(k), rel=1e-12)
        assert sensitivity(C, sep) == pytest.approx(math.sqrt(k), rel=1e-12)
    k = math.ceil(n / bands)
    for sep in range(1, bands):
        assert brute_force(C, sep, k) > math.sqrt(k) + 1e-3
        assert sensitivity(C, sep, k) == pytest.approx(brute_force(C, sep, k), rel=1e-12)


def test_toeplitz_normalised_sensitivity_never_exceeds_sqrt_participations() -> None:
    # the truncated last columns only make it smaller: the DP-SGD reduction is conservative
    n, bands = 50, 8
    C = strategy_matrix(sqrt_coefficients(bands), n)
    assert sensitivity(C, bands) <= math.sqrt(math.ceil(n / bands)) + 1e-12
    assert sensitivity(strategy_matrix(sqrt_coefficients(bands), 48), bands) == pytest.approx(
        6**0.5
    )
