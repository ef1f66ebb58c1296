"""Small models and data sets shared by the engine tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpcore.registry import get_registry


def mlp(seed: int = 0, d_in: int = 6, hidden: int = 8, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def dataset(n: int = 48, d_in: int = 6, classes: int = 3, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)
    )


def loader(ds: TensorDataset, batch_size: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size)


def grad_sampler_names() -> list[str]:
    """Every registered grad sampler (the real ones, whoever wrote them)."""
    return get_registry().names("grad_sampler")


@pytest.fixture
def accountant_name() -> str:
    """The engine tests account with the (fast) built-in RDP accountant."""
    assert "rdp" in get_registry().names("accountant"), get_registry().failures
    return "rdp"
