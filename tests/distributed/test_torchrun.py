"""``torchrun --nproc-per-node 2 -m dpcore train CONFIG`` on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpcore.accounting import compute_epsilon
from dpcore.checkpoint import read_checkpoint

CONFIG = """\
noise_multiplier = 1.0
max_grad_norm = 1.0
seed = 3
accountant = { name = "rdp" }

[train]
epochs = 2
batch_size = 360
lr = 0.5
"""


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "dpcore", "train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.mark.slow
def test_dpcore_train_under_torchrun(tmp_path):
    (tmp_path / "cfg.toml").write_text(CONFIG)
    run = torchrun("cfg.toml", "--run-dir", "run", "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = [
        json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    ]
    # only rank 0 writes: one record per epoch and one for the end
    assert [r.get("epoch") for r in records[:-1]] == [1, 2] and records[-1]["event"] == "completed"
    assert (tmp_path / "run/model.pt").is_file()
    checkpoints = sorted((tmp_path / "run").rglob("*.pt"))
    newest = max((p for p in checkpoints if p.name != "model.pt"), key=lambda p: p.stat().st_mtime)
    state = read_checkpoint(newest)["engine"]
    # the distributed run: 2 ranks, the global rate, every real step accounted once
    assert state["world_size"] == 2
    assert state["sample_rate"] == pytest.approx(360 / 1437, rel=0.05)
    assert len(state["accountant"]["history"]) >= 1
    steps = state["steps"]
    assert steps == 2 * round(1 / state["sample_rate"])
    # epsilon: that of `steps` steps at the global rate, as a single process would spend
    expected = compute_epsilon(
        noise_multiplier=1.0, sample_rate=state["sample_rate"], steps=steps, delta=1e-5,
        accountant="rdp",
    )  # fmt: skip
    assert records[-1]["epsilon"] == pytest.approx(expected, rel=1e-9)
