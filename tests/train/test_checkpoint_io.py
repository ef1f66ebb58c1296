"""Atomic writes and safe loading of checkpoint files."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from dpcore.checkpoint import (
    FORMAT_VERSION,
    atomic_save,
    privacy_differences,
    read_checkpoint,
    safe_load,
)
from dpcore.errors import CheckpointError


def test_atomic_save_round_trip_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "a.pt"
    state = {"w": torch.arange(5.0), "n": 3, "names": ["a", "b"], "nested": {"g": torch.zeros(2)}}
    atomic_save(state, path)
    atomic_save({**state, "n": 4}, path)  # overwrite in place
    loaded = safe_load(path)
    assert loaded["n"] == 4 and torch.equal(loaded["w"], state["w"])
    assert sorted(os.listdir(path.parent)) == ["a.pt"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    atomic_save({"v": 1}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert safe_load(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["a.pt"]


class _Payload:
    """Unpickling this runs a command; weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_payload_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"dpcore_checkpoint": FORMAT_VERSION, "engine": {}, "module": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"pickled objects.*GLOBAL posix.system"):
        read_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_raw_pickle_file_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError):
        safe_load(path)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_and_garbage_files_are_corrupted_not_crashes(tmp_path):
    good = tmp_path / "good.pt"
    atomic_save({"dpcore_checkpoint": FORMAT_VERSION, "engine": {}, "module": {}}, good)
    data = good.read_bytes()
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    for p in (truncated, garbage):
        with pytest.raises(CheckpointError, match="corrupted"):
            read_checkpoint(p)
    assert zipfile.is_zipfile(good)


def test_format_and_kind_are_checked(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"weights": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="not a dpcore checkpoint"):
        read_checkpoint(path)
    atomic_save({"dpcore_checkpoint": FORMAT_VERSION + 1, "engine": {}, "module": {}}, path)
    with pytest.raises(CheckpointError, match="format"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def test_privacy_differences_name_each_changed_key():
    base = {
        "sample_rate": 0.01,
        "noise_multiplier": 1.1,
        "num_samples": 1000,
        "world_size": 1,
        "config": {
            "max_grad_norm": 1.0,
            "clipper": {"name": "flat"},
            "noise": {"name": "gaussian"},
            "sampler": {"name": "poisson"},
            "accountant": {"name": "prv", "eps_error": 0.01},
            "grad_sampler": {"name": "hooks"},
            "seed": 1,
        },
    }
    assert privacy_differences(base, base) == []
    changed = {
        **base,
        "sample_rate": 0.02,
        "num_samples": 999,
        "config": {
            **base["config"],
            "accountant": {"name": "rdp"},
            "grad_sampler": {"name": "bk"},
            "seed": 2,
        },
    }
    diffs = privacy_differences(base, changed)
    assert [d.split(":")[0] for d in diffs] == ["sample_rate", "num_samples", "accountant"]
    assert "0.01" in diffs[0] and "0.02" in diffs[0]


def test_sigkill_during_write_leaves_previous_file(tmp_path):
    """A process killed in the middle of torch.save leaves only a temp file behind."""
    path = tmp_path / "c.pt"
    atomic_save({"v": torch.ones(3)}, path)
    script = f"""
import os, signal, torch
from dpcore.checkpoint import atomic_save
def dying_save(obj, fh):
    fh.write(b"PK\\x03\\x04 half a checkpoint")
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
atomic_save({{"v": torch.zeros(3)}}, {str(path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert torch.equal(safe_load(path)["v"], torch.ones(3))
    leftovers = [p for p in os.listdir(tmp_path) if p != "c.pt"]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")


def test_non_plain_data_is_not_written(tmp_path):
    import datetime

    path = tmp_path / "c.pt"
    atomic_save({"v": 1}, path)
    with pytest.raises(CheckpointError, match=r"\['extra'\]\['when'\] \(datetime\)"):
        atomic_save({"v": 2, "extra": {"when": datetime.datetime.now()}}, path)
    assert safe_load(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["c.pt"]
