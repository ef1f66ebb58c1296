"""The built-in example that `dpcore train` runs with no config."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dpcore.cli import app
from dpcore.examples.digits import digits, digits_cnn
from dpcore.train import TrainConfig


def test_digits_data_and_model_fit():
    train_set, test_set = digits()
    assert (len(train_set), len(test_set)) == (1437, 360)
    x, y = train_set[0]
    assert x.shape == (1, 8, 8) and y.dtype == torch.int64
    assert digits_cnn()(x[None]).shape == (1, 10)


def test_default_config_is_the_documented_bar():
    cfg = TrainConfig.default()
    assert cfg.engine.target_epsilon == 3.0 and cfg.engine.delta == 1e-5
    assert cfg.train.model == "digits_cnn" and cfg.train.dataset == "digits"


def test_dpcore_train_smoke_one_epoch(tmp_path):
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["train", "--epochs", "1", "--run-dir", str(run_dir), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert "summary" in res.output and "test accuracy" in res.output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["epoch"] == 1 and 0 < records[0]["epsilon"] < 3
    assert records[-1]["event"] == "completed"
    weights = torch.load(run_dir / "model.pt", weights_only=True)
    model = digits_cnn()
    model.load_state_dict(weights)


@pytest.mark.slow
def test_dpcore_train_default_meets_the_accuracy_bar(tmp_path):
    """`dpcore train` with no arguments: >= 85% test accuracy at epsilon <= 3 (delta 1e-5).
    (Its wall time is measured by benchmarks/bench_train_digits.py, not asserted here.)"""
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--run-dir", str(run_dir), "--no-progress"])
    assert res.exit_code == 0, res.output
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_epoch = [r for r in final if "epoch" in r][-1]
    assert last_epoch["epoch"] == 30
    assert last_epoch["test_accuracy"] >= 0.85
    assert last_epoch["epsilon"] <= 3.0 and last_epoch["delta"] == 1e-5
