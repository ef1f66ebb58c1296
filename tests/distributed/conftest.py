"""Distributed tests spawn small gloo process groups on CPU (see ``dist_harness``)."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

# Spawned processes import their worker functions by module name; putting this folder
# on sys.path (which spawn hands to the children) makes ``dist_harness`` and
# ``dist_workers`` importable there.
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from dist_harness import TIMEOUT_S, free_port, run_ranks  # noqa: E402


@pytest.fixture
def single_rank_group():
    """A real gloo process group of world size 1 in the test process itself."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def group():
    """Per-rank results of one spawned 2-rank gloo group that runs every scenario the
    tests check (``dist_workers.all_scenarios``): spawning, not the work, is what costs
    time, so the group is spawned once for the session."""
    from dist_workers import all_scenarios

    return run_ranks(all_scenarios, 2)
