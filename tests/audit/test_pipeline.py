"""Canaries in the real pipeline: correct plugins pass, broken ones are caught."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dpcore.audit.run import run_audit
from dpcore.registry import get_registry, reset_registry

FAULTY = Path(__file__).resolve().parents[1] / "plugins" / "dpcore-faulty"


@pytest.fixture(scope="module")
def faulty_plugins() -> Iterator[None]:
    """Install the broken test plugins into the environment for real (entry points), and
    uninstall them afterwards so no other test ever sees them."""
    import tomllib

    wanted = tomllib.loads((FAULTY / "pyproject.toml").read_text())["project"]["version"]
    try:
        installed = md.version("dpcore-faulty")
    except md.PackageNotFoundError:
        installed = None
    if installed != wanted:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
             "--no-index", str(FAULTY)],
            check=True,
        )  # fmt: skip
    reset_registry()
    yield
    if installed != wanted:
        pip = [sys.executable, "-m", "pip", "uninstall", "-q", "-y", "dpcore-faulty"]
        subprocess.run(pip, check=True)
    reset_registry()


@pytest.fixture(scope="module")
def sigma_eps1() -> float:
    """Noise for epsilon = 1 over the audits' 100 steps at rate 0.1 (calibrated once)."""
    import dpcore

    return dpcore.get_noise_multiplier(
        target_epsilon=1.0, target_delta=1e-5, sample_rate=0.1, steps=100
    )


def eps1_config(sigma: float, **components: object) -> dict:
    return {"noise_multiplier": sigma, "delta": 1e-5, "max_grad_norm": 1.0, "seed": 0,
            **components}  # fmt: skip


def test_correct_pipeline_stays_below_its_claim(sigma_eps1: float) -> None:
    report = run_audit(eps1_config(sigma_eps1), canaries=1000, steps=100)
    assert report.claimed_epsilon == pytest.approx(1.0, abs=0.011)
    assert 0 <= report.epsilon_lower_bound <= report.claimed_epsilon
    assert report.epsilon_lower_bound_fdp <= report.claimed_epsilon
    assert abs(report.mu_hat - report.mu_expected) <= report.mu_tolerance
    assert report.max_contribution <= report.sensitivity * (1 + 1e-6)
    assert report.verdict == "pass" and report.reasons == []
    assert report.canaries == 1000 and report.steps == 100


@pytest.mark.plugins
def test_plugins_are_found_through_entry_points(faulty_plugins: None) -> None:
    registry = get_registry()
    assert "faulty_no_clip" in registry.names("clipper")
    assert {"faulty_no_noise", "faulty_half_noise"} <= set(registry.names("noise"))
    assert registry.get("clipper", "faulty_no_clip").provider == "dpcore-faulty"
    assert "faulty_double_rate" in registry.names("sampler")
    assert "faulty_optimistic" in registry.names("accountant")


@pytest.mark.plugins
@pytest.mark.parametrize(
    ("component", "name", "reason"),
    [("clipper", "faulty_no_clip", "does not clip"), ("noise", "faulty_no_noise", "exceeds")],
)
def test_gross_faults_are_caught(
    faulty_plugins: None, sigma_eps1: float, component: str, name: str, reason: str
) -> None:
    config = eps1_config(sigma_eps1, **{component: {"name": name}})
    report = run_audit(config, canaries=1000, steps=100)
    assert report.claimed_epsilon == pytest.approx(1.0, abs=0.011)
    assert report.epsilon_lower_bound > 2
    assert report.epsilon_lower_bound_fdp > 2
    assert report.verdict == "fail"
    assert any(reason in r for r in report.reasons)


@pytest.mark.plugins
def test_cli_exits_1_and_prints_the_report_as_json(faulty_plugins: None, tmp_path: Path) -> None:
    from dpcore.cli import app

    config = tmp_path / "nonoise.toml"
    config.write_text(
        'target_epsilon = 1.0\nepochs = 1\ndelta = 1e-5\nmax_grad_norm = 1.0\nseed = 0\n'
        'noise = { name = "faulty_no_noise" }\n[audit]\ncanaries = 1000\n'
    )  # fmt: skip
    result = CliRunner().invoke(app, ["audit", str(config), "--steps", "100", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    for key in ("claimed_epsilon", "delta", "alpha", "canaries", "guesses", "correct",
                "epsilon_lower_bound", "epsilon_lower_bound_fdp", "mu_hat", "mu_expected",
                "seed", "verdict"):  # fmt: skip
        assert key in report
    assert report["verdict"] == "fail" and report["epsilon_lower_bound"] > 2
    assert report["canaries"] == 1000


@pytest.mark.plugins
@pytest.mark.slow
def test_half_noise_is_caught_by_calibration(faulty_plugins: None, sigma_eps1: float) -> None:
    correct = run_audit(eps1_config(sigma_eps1), canaries=10_000, steps=100)
    assert correct.verdict == "pass"
    assert correct.mu_tolerance / correct.mu_expected < 0.3
    half_noise = eps1_config(sigma_eps1, noise={"name": "faulty_half_noise"})
    half = run_audit(half_noise, canaries=10_000, steps=100)
    assert half.mu_hat > half.mu_expected + half.mu_tolerance
    assert half.verdict == "fail"
    assert any("mu_hat" in r for r in half.reasons)


def _simulated_pipeline_scores(rng, reps: int, m: int, steps: int, q: float, noise: float):
    """Scores of Dirac canaries exactly as the pipeline makes them: an in-canary adds the
    clipping bound (1) at each of its Binomial(steps, q) draws; every score gets the
    noise of every step."""
    included = rng.random((reps, m)) < 0.5
    draws = rng.binomial(steps, q, size=(reps, m)) * included
    return draws + rng.normal(scale=noise * np.sqrt(steps), size=(reps, m)), included


@pytest.mark.parametrize("m", [1000, 10_000])
def test_mu_tolerance_false_alarms_and_power(m: int) -> None:
    from dpcore.audit import estimators as E

    rng = np.random.default_rng(m)
    steps, q, sigma, reps = 100, 0.1, 4.0, 400 if m == 10_000 else 2000
    expected = E.expected_mu(np.ones(steps), np.full(steps, sigma), q)

    def outside(noise: float) -> float:
        scores, included = _simulated_pipeline_scores(rng, reps, m, steps, q, noise)
        misses = 0
        for s, inc in zip(scores, included, strict=True):
            cal = E.calibrate(s, inc)
            misses += abs(cal.mu_hat - expected) > E.tolerance(cal.standard_error_at(expected))
        return misses / reps

    assert outside(sigma) <= 0.005  # 1/1000 by construction; a few in 2000 by chance
    if m == 10_000:
        assert outside(sigma / 2) == 1.0  # half the noise: always caught


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--sample-rate", "0"], "sample_rate"), (["--selection", "best"], "selection")],
)
def test_cli_rejects_bad_settings_clearly(args: list[str], message: str) -> None:
    from dpcore.cli import app

    result = CliRunner().invoke(app, ["audit", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_cli_rejects_unknown_audit_keys(tmp_path: Path) -> None:
    from dpcore.cli import app

    config = tmp_path / "c.toml"
    config.write_text("noise_multiplier = 1.0\n[audit]\ncanary = 10\n")
    result = CliRunner().invoke(app, ["audit", str(config)])
    assert result.exit_code == 2 and "canary" in result.output


@pytest.mark.plugins
def test_sampler_at_twice_its_rate_is_caught(faulty_plugins: None, sigma_eps1: float) -> None:
    config = eps1_config(sigma_eps1, sampler={"name": "faulty_double_rate"})
    report = run_audit(config, canaries=4000, steps=100)
    assert report.mu_hat > report.mu_expected + report.mu_tolerance
    assert report.verdict == "fail"


@pytest.mark.plugins
@pytest.mark.slow
def test_accountant_under_reporting_tenfold_is_caught(
    faulty_plugins: None, sigma_eps1: float
) -> None:
    config = eps1_config(sigma_eps1, accountant={"name": "faulty_optimistic"})
    report = run_audit(config, canaries=10_000, steps=100)
    assert report.claimed_epsilon < 0.2
    assert report.epsilon_lower_bound > report.claimed_epsilon
    assert report.verdict == "fail"
