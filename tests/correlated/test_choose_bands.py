"""choose_bands: calibration per candidate, relative prefix error, best choice."""

from __future__ import annotations

import math

import pytest

from dpcore.correlated import (
    choose_bands,
    choose_bands_for_rate,
    expected_prefix_rmse,
    sqrt_coefficients,
)
from dpcore.errors import ConfigError


def test_each_candidate_is_calibrated_as_dpsgd_with_ceil_n_over_b_steps_at_rate_qb() -> None:
    calls = []

    def fake_sigma(*, target_epsilon, target_delta, sample_rate, steps, **_):
        calls.append((sample_rate, steps))
        return 0.5 + sample_rate * 3  # any increasing function of the rate

    choice = choose_bands(4.0, 1e-5, 1000, 50, 101, noise_multiplier_fn=fake_sigma)
    assert [r.bands for r in choice.candidates] == [1, 2, 4, 8, 16]  # b <= N / B = 20
    for row, (rate, steps) in zip(choice.candidates, calls, strict=True):
        assert rate == pytest.approx(50 * row.bands / 1000) == row.sample_rate
        assert steps == math.ceil(101 / row.bands) == row.accounted_steps
        sigma = 0.5 + rate * 3
        assert row.prefix_rmse == pytest.approx(
            expected_prefix_rmse(sqrt_coefficients(row.bands), 101, sigma)
        )
    assert choice.candidates[0].relative_error == 1.0
    assert choice.best == min(choice.candidates, key=lambda r: r.prefix_rmse)


def test_same_noise_for_every_b_makes_more_bands_better() -> None:
    choice = choose_bands_for_rate(
        8.0,
        1e-5,
        0.01,
        500,
        candidates=[1, 3, 7, 50, 200],
        noise_multiplier_fn=lambda **_: 1.0,
    )
    errors = [r.relative_error for r in choice.candidates]
    assert [r.bands for r in choice.candidates] == [1, 3, 7, 50]  # 200 > 1 / q dropped
    assert errors == sorted(errors, reverse=True) and choice.best.bands == 50


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ConfigError):
        choose_bands(1.0, 1e-5, 10, 20, 100, noise_multiplier_fn=lambda **_: 1.0)
    with pytest.raises(ConfigError):
        choose_bands_for_rate(1.0, 1e-5, 0.1, 0, noise_multiplier_fn=lambda **_: 1.0)


@pytest.mark.slow
def test_gain_depends_on_the_budget_with_a_real_accountant() -> None:
    pytest.importorskip("dpcore.accounting")
    # N = 50,000, B = 500, 2,000 steps: no gain at eps = 1, about 0.5x at eps = 16
    low = choose_bands(1.0, 1e-5, 50_000, 500, 2000, accountant="rdp")
    high = choose_bands(16.0, 1e-5, 50_000, 500, 2000, accountant="rdp")
    assert low.best.bands == 1
    assert all(r.relative_error > 0.99 for r in low.candidates)
    assert high.best.bands >= 32 and 0.45 < high.best.relative_error < 0.6
