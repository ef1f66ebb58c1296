"""`dpcore epsilon` and `dpcore noise`: happy paths and every invalid input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from accounting._reference import gaussian_epsilon
from dpcore.cli import app

runner = CliRunner()


def test_epsilon_json_matches_the_exact_gaussian_at_full_batch():
    result = runner.invoke(
        app, ["epsilon", "-q", "1", "-s", "2", "-n", "16", "-d", "1e-5", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    exact = gaussian_epsilon(4 / 2, 1e-5)  # mu = sqrt(16) / 2
    assert out["accountant"] == "prv" and out["steps"] == 16
    assert out["epsilon_lower"] <= exact <= out["epsilon"]


def test_epsilon_table_with_rdp_reports_the_best_order():
    result = runner.invoke(
        app, ["epsilon", "-q", "0.004", "-s", "1.1", "-n", "1000", "-d", "1e-5", "-a", "rdp"]
    )
    assert result.exit_code == 0, result.output
    assert "privacy spent" in result.output and "best order" in result.output


def test_epsilon_with_accountant_option():
    result = runner.invoke(
        app,
        [
            "epsilon",
            "-q",
            "0.01",
            "-s",
            "1",
            "-n",
            "100",
            "-d",
            "1e-5",
            "-o",
            "eps_error=0.1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["epsilon"] - out["epsilon_lower"] > 0.1  # the looser bound shows


def test_noise_meets_the_target():
    result = runner.invoke(
        app, ["noise", "--target-epsilon", "2", "-q", "0.01", "-n", "300", "-d", "1e-5", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert 1.99 <= out["epsilon"] <= 2.0 and out["noise_multiplier"] > 0


def test_gdp_warning_is_one_plain_line():
    result = runner.invoke(
        app, ["noise", "-e", "2", "-q", "0.01", "-n", "300", "-d", "1e-5", "-a", "gdp"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("warning:") == 1 and "Traceback" not in result.output


BAD = [
    (["epsilon", "-q", "0", "-s", "1", "-n", "10", "-d", "1e-5"], "sample_rate"),
    (["epsilon", "-q", "1.5", "-s", "1", "-n", "10", "-d", "1e-5"], "sample_rate"),
    (["epsilon", "-q", "-0.1", "-s", "1", "-n", "10", "-d", "1e-5"], "sample_rate"),
    (["epsilon", "-q", "0.1", "-s", "0", "-n", "10", "-d", "1e-5"], "noise_multiplier"),
    (["epsilon", "-q", "0.1", "-s", "-1", "-n", "10", "-d", "1e-5"], "noise_multiplier"),
    (["epsilon", "-q", "0.1", "-s", "1", "-n", "10", "-d", "0"], "delta"),
    (["epsilon", "-q", "0.1", "-s", "1", "-n", "10", "-d", "1"], "delta"),
    (["epsilon", "-q", "0.1", "-s", "1", "-n", "-3", "-d", "1e-5"], "steps"),
    (["epsilon", "-q", "0.1", "-s", "1", "-n", "10", "-d", "1e-5", "-a", "nope"], "nope"),
    (["epsilon", "-q", "0.1", "-s", "1", "-n", "10", "-d", "1e-5", "-o", "x"], "KEY=VALUE"),
    (["noise", "-e", "1", "-q", "0", "-n", "10", "-d", "1e-5"], "sample_rate"),
    (["noise", "-e", "1", "-q", "2", "-n", "10", "-d", "1e-5"], "sample_rate"),
    (["noise", "-e", "1", "-q", "0.1", "-n", "10", "-d", "1.5"], "delta"),
    (["noise", "-e", "0", "-q", "0.1", "-n", "10", "-d", "1e-5"], "target_epsilon"),
    (["noise", "-e", "1", "-q", "0.1", "-n", "0", "-d", "1e-5"], "steps"),
]


@pytest.mark.parametrize("args, needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_invalid_input_is_one_clear_error(args, needle):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and needle in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
