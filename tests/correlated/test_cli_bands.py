"""``dpcore noise --bands`` and ``dpcore noise --choose-bands``."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from dpcore.cli import app

accounting = pytest.importorskip("dpcore.accounting")
runner = CliRunner()
BASE = ["noise", "-e", "4", "-q", "0.01", "-n", "300", "-d", "1e-5", "-a", "rdp", "--json"]


def test_bands_calibrates_as_dpsgd_with_ceil_n_over_b_steps_at_rate_bq() -> None:
    out = runner.invoke(app, [*BASE, "--bands", "7"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["bands"] == 7 and result["accounted_steps"] == math.ceil(300 / 7)
    assert result["accounted_rate"] == pytest.approx(0.07)
    expected = accounting.get_noise_multiplier(
        target_epsilon=4,
        target_delta=1e-5,
        sample_rate=0.07,
        steps=math.ceil(300 / 7),
        accountant="rdp",
    )
    assert result["noise_multiplier"] == pytest.approx(expected, rel=1e-9)
    plain = json.loads(runner.invoke(app, BASE).output)
    one = json.loads(runner.invoke(app, [*BASE, "--bands", "1"]).output)
    assert one["noise_multiplier"] == plain["noise_multiplier"]


def test_too_many_bands_for_the_rate_is_one_clear_line() -> None:
    out = runner.invoke(app, [*BASE, "--bands", "200"])
    assert out.exit_code != 0
    assert "at most 100 bands" in out.output


def test_choose_bands_reports_every_candidate_and_the_best() -> None:
    out = runner.invoke(app, [*BASE, "--choose-bands"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    rows = report["candidates"]
    assert [r["bands"] for r in rows] == [1, 2, 4, 8, 16, 32, 64]
    assert rows[0]["relative_error"] == 1.0
    best = min(rows, key=lambda r: r["prefix_rmse"])
    assert report["best_bands"] == best["bands"] > 1  # eps = 4 over 300 steps: BandMF helps
    table = runner.invoke(app, [*BASE[:-1], "--choose-bands"])
    assert table.exit_code == 0 and "vs DP-SGD" in table.output and "best: bands" in table.output
