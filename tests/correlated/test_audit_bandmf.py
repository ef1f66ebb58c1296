"""``dpcore audit`` on a BandMF config: the empirical bound stays at or below the claim."""

from __future__ import annotations

import pytest

audit_run = pytest.importorskip("dpcore.audit.run")


@pytest.mark.slow
def test_audit_of_bandmf_with_cyclic_poisson_passes() -> None:
    config = {
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "seed": 0,
        "grad_sampler": {"name": "bk"},
        "noise": {"name": "bandmf", "bands": 4},
        "sampler": {"name": "cyclic_poisson"},
        "accountant": {"name": "rdp"},
    }
    report = audit_run.run_audit(config, canaries=600, steps=60, sample_rate=0.1)
    assert report.verdict == "pass"
    assert report.epsilon_lower_bound <= report.claimed_epsilon
    assert report.epsilon_lower_bound_fdp <= report.claimed_epsilon
