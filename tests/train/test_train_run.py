"""`dpcore train`: interruption and resume, checkpoints, budget, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import resume_worker as w  # this folder is on sys.path (conftest.py)
import torch
from typer.testing import CliRunner

from dpcore.checkpoint import read_checkpoint
from dpcore.cli import app
from dpcore.errors import CheckpointError
from dpcore.train import TrainConfig, list_checkpoints, train

HERE = Path(__file__).parent


def _quiet() -> dict:
    import io

    from rich.console import Console

    return {"console": Console(file=io.StringIO(), width=120), "progress": False}


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(w.TRAIN_TOML)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("ref")
    cfg = TrainConfig.from_dict(__import__("tomllib").loads(w.TRAIN_TOML))
    result = train(cfg, run_dir=run_dir, **_quiet())
    assert result.stopped == "completed" and result.steps == 30
    return result, torch.load(run_dir / "model.pt", weights_only=True)


def _same_model(run_dir: Path, expected: dict) -> bool:
    got = torch.load(run_dir / "model.pt", weights_only=True)
    return got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_reaches_the_same_state(config_file, tmp_path, reference):
    ref, ref_model = reference
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpcore", "train", str(config_file), "--run-dir", str(run_dir)],
        env=_env(DPCORE_TEST_DELAY="0.004"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any("epoch" in m for m in _metrics(run_dir)):  # wait for the first epoch
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    out = " ".join(out.split())
    assert "interrupted by SIGTERM" in out and "--resume auto" in out
    events = [m for m in _metrics(run_dir) if "event" in m]
    assert events[-1]["event"] == "interrupted" and events[-1]["step"] < 30
    assert not (run_dir / "model.pt").exists()

    result = train(config_file, resume="auto", run_dir=run_dir, **_quiet())
    assert result.stopped == "completed" and result.steps == 30
    assert result.epsilon == ref.epsilon
    assert _same_model(run_dir, ref_model)
    assert len(list_checkpoints(run_dir)) == 2  # keep_last


def test_sigint_mid_batch_finishes_the_step_then_resume_matches(
    config_file, tmp_path, reference, monkeypatch
):
    ref, ref_model = reference
    run_dir = tmp_path / "run"
    monkeypatch.setattr(w._SlowDataset, "items_read", 0)
    monkeypatch.setenv("DPCORE_TEST_SIGNAL_AT", "100")  # inside step 13 (about 8 items a step)
    result = train(config_file, run_dir=run_dir, **_quiet())
    assert result.stopped == "interrupted" and result.signal == "SIGINT"
    assert 10 < result.steps < 30 and result.checkpoint is not None
    saved = read_checkpoint(result.checkpoint)
    assert saved["engine"]["steps"] == result.steps
    monkeypatch.delenv("DPCORE_TEST_SIGNAL_AT")
    resumed = train(config_file, resume="auto", run_dir=run_dir, **_quiet())
    assert resumed.stopped == "completed" and resumed.epsilon == ref.epsilon
    assert _same_model(run_dir, ref_model)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_and_resumes(
    config_file, tmp_path, reference
):
    _, ref_model = reference
    run_dir = tmp_path / "run"
    script = f"""
import os, signal, sys, torch
import dpcore.checkpoint as ckpt
writes = []
real_save = torch.save
def dying_save(obj, fh):
    writes.append(1)
    if len(writes) == 3:  # the third checkpoint: half written, then killed
        fh.write(b"PK\\x03\\x04 half a checkpoint"); fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, fh)
ckpt.torch.save = dying_save
from dpcore.train import train
train({str(config_file)!r}, run_dir={str(run_dir)!r}, progress=False)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    saved = list_checkpoints(run_dir)
    assert [p.name for p in saved] == ["ckpt-e0002-s00000010.pt", "ckpt-e0001-s00000005.pt"]
    assert any(p.name.endswith(".tmp") for p in (run_dir / "checkpoints").iterdir())
    read_checkpoint(saved[0])  # intact

    result = train(config_file, resume="auto", run_dir=run_dir, **_quiet())
    assert result.stopped == "completed" and _same_model(run_dir, ref_model)
    assert not any(p.name.endswith(".tmp") for p in (run_dir / "checkpoints").iterdir())


def test_resume_auto_skips_a_corrupted_checkpoint(config_file, tmp_path, reference):
    _, ref_model = reference
    run_dir = tmp_path / "run"
    first = train(config_file, run_dir=run_dir, epochs=3, **_quiet())
    newest = list_checkpoints(run_dir)[0]
    assert newest == first.checkpoint
    newest.write_bytes(newest.read_bytes()[:200])
    with pytest.warns(UserWarning, match=f"skipping checkpoint {newest.name}"):
        # no config: the run directory's recorded config.json is used
        result = train(None, resume="auto", run_dir=run_dir, **_quiet())
    assert result.engine.config.noise_multiplier == 0.8
    for path in list_checkpoints(run_dir):  # all unreadable: refuse to start over
        path.write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no checkpoint"):
        train(None, resume="auto", run_dir=run_dir, **_quiet())
    assert result.stopped == "completed" and _same_model(run_dir, ref_model)


def test_refuses_to_overwrite_a_run_and_resume_auto_starts_fresh(config_file, tmp_path):
    run_dir = tmp_path / "run"
    train(config_file, run_dir=run_dir, epochs=1, **_quiet())
    with pytest.raises(Exception, match="already has checkpoints"):
        train(config_file, run_dir=run_dir, epochs=1, **_quiet())
    fresh = train(config_file, resume="auto", run_dir=tmp_path / "new", epochs=1, **_quiet())
    assert fresh.steps == 5


def test_privacy_config_change_is_refused_or_composed(config_file, tmp_path):
    import tomllib

    from dpcore.registry import get_registry

    run_dir = tmp_path / "run"
    train(config_file, run_dir=run_dir, epochs=2, **_quiet())
    changed = tomllib.loads(w.TRAIN_TOML)
    changed["noise_multiplier"] = 1.3
    with pytest.raises(CheckpointError, match=r"noise_multiplier: checkpoint 0\.8, engine 1\.3"):
        train(changed, resume="auto", run_dir=run_dir, epochs=3, **_quiet())
    result = train(
        changed, resume="auto", run_dir=run_dir, epochs=3, allow_config_change=True, **_quiet()
    )
    assert result.engine.accountant.history == [(0.8, 0.2, 10), (1.3, 0.2, 5)]
    both = get_registry().create("accountant", "rdp")
    both.step(noise_multiplier=0.8, sample_rate=0.2, steps=10)
    both.step(noise_multiplier=1.3, sample_rate=0.2, steps=5)
    assert result.epsilon == both.get_epsilon(1e-5)


def test_stops_before_exceeding_the_epsilon_budget(tmp_path):
    import tomllib

    from dpcore.registry import get_registry

    cfg = tomllib.loads(w.TRAIN_TOML)
    cfg["train"]["epsilon_budget"] = 5.0
    result = train(cfg, run_dir=tmp_path / "run", **_quiet())
    assert result.stopped == "budget" and 0 < result.steps < 30
    assert result.epsilon <= 5.0
    one_more = get_registry().create("accountant", "rdp")
    one_more.step(noise_multiplier=0.8, sample_rate=0.2, steps=result.steps + 1)
    assert one_more.get_epsilon(1e-5) > 5.0
    assert result.checkpoint is not None and (tmp_path / "run" / "model.pt").exists()


BAD_CONFIGS = {  # (text in the good config, replacement, key the error must name)
    "unknown plugin": ('accountant = "rdp"', 'accountant = "rdpp"', "accountant"),
    "bad plugin option": (
        'accountant = "rdp"',
        'accountant = { name = "rdp", eps_eror = 1 }',
        "accountant",
    ),
    "wrong type": ("lr = 0.5", 'lr = "fast"', "train.lr"),
    "unknown train key": ("batch_size = 8", "batchsize = 8", "train.batchsize"),
    "missing import path": (
        'model = "resume_worker:make_model"',
        'model = "no_such_pkg.models:net"',
        "train.model",
    ),
    "bad model option": (
        "[train]",
        "[train]\nmodel_options = { width = 3 }",
        "train.model_options",
    ),
    "bad optimizer option": ("momentum = 0.9", "momentun = 0.9", "train.optimizer_options"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_fails_before_training_naming_the_key(tmp_path, name):
    good, bad, key = BAD_CONFIGS[name]
    assert good in w.TRAIN_TOML
    path = tmp_path / "bad.toml"
    path.write_text(w.TRAIN_TOML.replace(good, bad))
    res = CliRunner().invoke(
        app, ["train", str(path), "--run-dir", str(tmp_path / "run")], env={"PYTHONPATH": str(HERE)}
    )
    assert res.exit_code == 2, res.output
    assert key in res.output and "Traceback" not in res.output
    assert not list_checkpoints(tmp_path / "run")


def test_print_default_config_is_the_default(tmp_path):
    import tomllib

    res = CliRunner().invoke(app, ["train", "--print-default-config"])
    assert res.exit_code == 0
    printed = TrainConfig.from_dict(tomllib.loads(res.output))
    default = TrainConfig.default()
    assert (printed.engine, printed.train) == (default.engine, default.train)


def test_budget_counts_only_accounted_steps_with_correlated_noise(tmp_path):
    """With BandMF over cyclic Poisson (one event every 2 steps) the run stops right
    before the step that would add an event beyond the budget."""
    import tomllib

    from dpcore.registry import get_registry

    cfg = tomllib.loads(w.TRAIN_TOML)
    cfg.update(noise={"name": "bandmf", "bands": 2}, sampler={"name": "cyclic_poisson"})
    cfg["train"]["epsilon_budget"] = 5.0
    result = train(cfg, run_dir=tmp_path / "run", **_quiet())
    assert result.stopped == "budget" and result.epsilon <= 5.0
    assert result.steps % 2 == 0  # the next step would be accounted
    history = result.engine.accountant.history
    ((sigma, q, events),) = history
    assert events == result.steps // 2
    one_more = get_registry().create("accountant", "rdp")
    one_more.step(noise_multiplier=sigma, sample_rate=q, steps=events + 1)
    assert one_more.get_epsilon(1e-5) > 5.0
