"""Runs a tiny private training for the resume tests: N steps straight, or k steps and a
checkpoint, or load a checkpoint and continue to N. Used in-process and as a script
(``python resume_worker.py continue CASES.pt OUT.pt``) so that resuming happens in a new
process."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcore
from dpcore.config import EngineConfig

NUM_SAMPLES, BATCH_SIZE = 40, 8  # sample rate 1/5: 5 steps per epoch


def base_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "noise_multiplier": 0.8,
        "max_grad_norm": 0.5,
        "seed": 7,
        "grad_sampler": {"name": "hooks"},
        "accountant": {"name": "rdp"},
    }
    cfg.update(overrides)
    return cfg


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Dropout(0.2), nn.Linear(5, 3))


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(NUM_SAMPLES, 6, generator=g)
    y = torch.randint(0, 3, (NUM_SAMPLES,), generator=g)
    return TensorDataset(x, y)


def setup(case: dict[str, Any]) -> tuple[Any, nn.Module, Any, Any]:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loader = DataLoader(make_data(), batch_size=BATCH_SIZE)
    engine = dpcore.PrivacyEngine.from_config(EngineConfig.from_dict(case["config"]))
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader
    )
    return engine, model, optimizer, loader


def train_until(
    case: dict[str, Any], engine: Any, model: nn.Module, optimizer: Any, loader: Any, steps: int
) -> None:
    """Train until the engine has taken ``steps`` optimizer steps, stopping right after a
    step (never inside a logical batch), across epoch boundaries."""
    loss_fn = nn.CrossEntropyLoss()
    physical = case.get("max_physical_batch_size")
    while engine.steps < steps:
        manager = (
            dpcore.BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer
            )
            if physical
            else contextlib.nullcontext(loader)
        )
        with manager as batches:
            for x, y in batches:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
                if engine.steps >= steps:
                    break


def outcome(engine: Any, model: nn.Module) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "epsilon": engine.get_epsilon(1e-5),
        "steps": engine.steps,
    }


def straight(case: dict[str, Any], steps: int) -> dict[str, Any]:
    engine, model, optimizer, loader = setup(case)
    train_until(case, engine, model, optimizer, loader, steps)
    return outcome(engine, model)


def first_part(case: dict[str, Any], steps: int, path: Path) -> None:
    engine, model, optimizer, loader = setup(case)
    train_until(case, engine, model, optimizer, loader, steps)
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer, data_loader=loader)


def continue_from(
    case: dict[str, Any], steps: int, path: Path, *, before: bool = False
) -> dict[str, Any]:
    """Load the checkpoint (after make_private, or into the plain model and optimizer
    before it when ``before``) and train on to ``steps``."""
    if before:
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        engine = dpcore.PrivacyEngine.from_config(EngineConfig.from_dict(case["config"]))
        engine.load_checkpoint(path=path, module=model, optimizer=optimizer)
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(make_data(), batch_size=BATCH_SIZE),
        )
    else:
        engine, model, optimizer, loader = setup(case)
        engine.load_checkpoint(path=path, module=model, optimizer=optimizer, data_loader=loader)
    train_until(case, engine, model, optimizer, loader, steps)
    return outcome(engine, model)


if __name__ == "__main__":  # python resume_worker.py continue CASES.pt OUT.pt
    torch.set_num_threads(1)
    _, cases_path, out_path = sys.argv[1:4]
    jobs = torch.load(cases_path, weights_only=True)
    results = [
        continue_from(job["case"], job["steps"], Path(job["checkpoint"]), before=job["before"])
        for job in jobs
    ]
    torch.save(results, out_path)


# -- for `dpcore train` tests ---------------------------------------------------------------
class _SlowDataset(TensorDataset):
    """Sleeps DPCORE_TEST_DELAY seconds per item, so a signal can arrive mid-run; sends
    this process DPCORE_TEST_SIGNAL when item number DPCORE_TEST_SIGNAL_AT is read (in the
    middle of a batch, so the step must be finished before stopping)."""

    items_read = 0

    def __getitem__(self, i: int) -> Any:
        import os
        import signal
        import time

        delay = float(os.environ.get("DPCORE_TEST_DELAY", "0"))
        if delay:
            time.sleep(delay)
        _SlowDataset.items_read += 1
        if _SlowDataset.items_read == int(os.environ.get("DPCORE_TEST_SIGNAL_AT", "-1")):
            os.kill(os.getpid(), getattr(signal, os.environ.get("DPCORE_TEST_SIGNAL", "SIGINT")))
        return super().__getitem__(i)


def train_data() -> tuple[TensorDataset, TensorDataset]:
    data = make_data()
    g = torch.Generator().manual_seed(5)
    test = TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
    return _SlowDataset(*data.tensors), test


TRAIN_TOML = """\
noise_multiplier = 0.8
max_grad_norm = 0.5
seed = 3
accountant = "rdp"

[train]
model = "resume_worker:make_model"
dataset = "resume_worker:train_data"
lr = 0.5
optimizer_options = { momentum = 0.9 }
batch_size = 8
epochs = 6
keep_last = 2
"""
