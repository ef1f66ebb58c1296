"""N steps straight == k steps, checkpoint, a NEW PROCESS loads it and takes N - k steps:
bitwise identical parameters and identical epsilon, for every built-in sampler, clipper,
noise mechanism, accountant and grad sampler, with and without BatchMemoryManager (the
model has dropout, so torch's global random state must be restored too)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import resume_worker as w  # this folder is on sys.path (conftest.py)
import torch

from dpcore.registry import get_registry

TOTAL, FIRST = 12, 7  # 5 steps per epoch: the checkpoint is inside the second epoch

CASES: dict[str, dict] = {
    "poisson-flat-gaussian-rdp": {"config": w.base_config()},
    "accountant-gdp": {"config": w.base_config(accountant={"name": "gdp"})},
    "accountant-prv": {"config": w.base_config(accountant={"name": "prv"})},
    "clipper-per_layer": {
        "config": w.base_config(clipper={"name": "per_layer"}, max_grad_norm=[0.3, 0.2, 0.3, 0.2])
    },
    "clipper-adaptive": {"config": w.base_config(clipper={"name": "adaptive"})},
    "clipper-automatic": {"config": w.base_config(clipper={"name": "automatic"})},
    "sampler-shuffle": {"config": w.base_config(sampler={"name": "shuffle"})},
    "sampler-distributed_poisson": {
        "config": w.base_config(sampler={"name": "distributed_poisson"})
    },
    "noise-bandmf-cyclic_poisson": {
        "config": w.base_config(
            noise={"name": "bandmf", "bands": 2}, sampler={"name": "cyclic_poisson"}
        )
    },
    **{
        f"grad_sampler-{gs}": {"config": w.base_config(grad_sampler={"name": gs})}
        for gs in ("bk", "ghost", "functorch", "ew")
    },
    "batch-memory-manager": {"config": w.base_config(), "max_physical_batch_size": 3},
}


def test_cases_cover_every_builtin_plugin():
    """A built-in sampler, clipper, noise or accountant added later must join CASES."""
    registry = get_registry()
    used = {kind: set() for kind in ("sampler", "clipper", "noise", "accountant")}
    for case in CASES.values():
        cfg = case["config"]
        used["sampler"].add(cfg.get("sampler", {}).get("name", "poisson"))
        used["clipper"].add(cfg.get("clipper", {}).get("name", "flat"))
        used["noise"].add(cfg.get("noise", {}).get("name", "gaussian"))
        used["accountant"].add(cfg["accountant"]["name"])
    for kind, names in used.items():
        builtin = {i.name for i in registry.entries(kind) if i.provider == "dpcore"}
        assert builtin <= names, f"{kind}: no resume test for {sorted(builtin - names)}"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Straight runs in this process; resumed runs all in ONE new process."""
    tmp = tmp_path_factory.mktemp("resume")
    jobs, expected = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shuffle is not DP-exact and says so
        for name, case in CASES.items():
            expected[name] = w.straight(case, TOTAL)
            ckpt = tmp / f"{name}.pt"
            w.first_part(case, FIRST, ckpt)
            jobs.append({"case": case, "steps": TOTAL, "checkpoint": str(ckpt), "before": False})
        # also: load into the plain model/optimizer before make_private
        jobs.append(
            {
                "case": CASES["poisson-flat-gaussian-rdp"],
                "steps": TOTAL,
                "checkpoint": str(tmp / "poisson-flat-gaussian-rdp.pt"),
                "before": True,
            }
        )
    torch.save(jobs, tmp / "jobs.pt")
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(w.__file__)),
            "continue",
            str(tmp / "jobs.pt"),
            str(tmp / "out.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp / "out.pt", weights_only=True)
    names = [*CASES, "load-before-make_private"]
    expected["load-before-make_private"] = expected["poisson-flat-gaussian-rdp"]
    return {n: (expected[n], r) for n, r in zip(names, results, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("name", [*CASES, "load-before-make_private"])
def test_resume_in_new_process_is_bitwise_exact(resumed, name):
    expected, got = resumed[name]
    assert got["steps"] == expected["steps"] == TOTAL
    assert got["epsilon"] == expected["epsilon"]
    for key, value in expected["params"].items():
        assert torch.equal(got["params"][key], value), f"{name}: parameter {key} differs"


def test_restoring_only_weights_is_not_exact(tmp_path):
    """The comparison can fail: restoring model and optimizer alone (the hand-made way)
    continues with other batches and noise, so the parameters differ."""
    case = CASES["poisson-flat-gaussian-rdp"]
    expected = w.straight(case, TOTAL)
    w.first_part(case, FIRST, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    engine, model, optimizer, loader = w.setup(case)
    model.load_state_dict(saved["module"])
    optimizer.load_state_dict(saved["optimizer"])
    engine.accountant.load_state_dict(saved["engine"]["accountant"])
    engine.steps = optimizer.steps = FIRST
    w.train_until(case, engine, model, optimizer, loader, TOTAL)
    assert engine.get_epsilon(1e-5) == expected["epsilon"]
    assert not torch.equal(model._module[0].weight, expected["params"]["0.weight"])
