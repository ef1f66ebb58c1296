"""`dpcore train --audit M`: canaries in the built-in example's training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpcore.errors import ConfigError
from dpcore.train import TrainConfig, train


@pytest.mark.slow
def test_train_with_canaries_reports_bounds(tmp_path: Path) -> None:
    config = TrainConfig.default().to_dict()
    result = train(config, run_dir=tmp_path, epochs=1, progress=False, audit=100)
    report = result.audit
    assert report is not None and report.canaries == 100
    assert report.claimed_epsilon == pytest.approx(result.epsilon)
    assert report.steps == result.steps
    assert 0 <= report.epsilon_lower_bound <= report.claimed_epsilon
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    audits = [r for r in records if r.get("event") == "audit"]
    assert len(audits) == 1 and audits[0]["epsilon_lower_bound"] == report.epsilon_lower_bound
    with pytest.raises(ConfigError, match="audit"):
        train(config, run_dir=tmp_path, epochs=2, resume="auto", progress=False, audit=100)
