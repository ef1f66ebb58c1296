"""AuditReport serialisation, and the estimators' independence from torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from dpcore.audit.report import AuditReport

REQUIRED = ("claimed_epsilon", "delta", "alpha", "canaries", "guesses", "correct",
            "epsilon_lower_bound", "epsilon_lower_bound_fdp", "mu_hat", "mu_expected",
            "seed", "verdict")  # fmt: skip


def sample_report(**overrides: object) -> AuditReport:
    values: dict = dict(
        claimed_epsilon=1.0, delta=1e-5, alpha=0.05, canaries=1000, guesses=300, correct=201,
        epsilon_lower_bound=0.3, epsilon_lower_bound_fdp=0.4, mu_hat=0.25, mu_expected=0.26,
        seed=7, verdict="pass", plugins={"clipper": "flat"},
    )  # fmt: skip
    values.update(overrides)
    return AuditReport(**values)


def test_report_round_trips_through_json() -> None:
    report = sample_report(reasons=["x"], verdict="fail")
    data = json.loads(report.to_json())
    assert all(key in data for key in REQUIRED)
    assert AuditReport.from_dict(data) == report
    assert not AuditReport.from_dict(data).passed


def test_non_finite_numbers_become_null() -> None:
    data = json.loads(sample_report(mu_hat=math.inf).to_json())
    assert data["mu_hat"] is None
    assert data["mu_tolerance"] is None  # nan default
    back = AuditReport.from_dict(data)
    assert math.isnan(back.mu_tolerance)


def test_estimators_do_not_import_torch() -> None:
    code = "import sys, dpcore.audit.estimators, dpcore.audit.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
