"""Shared test configuration."""

from __future__ import annotations

import os

import pytest
import torch

from dpcore.registry import reset_registry

# Two cores are shared by the whole suite; keep torch from oversubscribing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def fresh_registry():
    """Rediscover plugins before and after a test that changes what is installed."""
    reset_registry()
    yield
    reset_registry()
