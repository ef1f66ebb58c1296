"""Make the plugin discoverable the way users get it: installed, with its entry point.

If ``dpcore-lowrank`` is not installed in the environment, it is pip-installed into a
temporary directory put on ``sys.path`` for the session (the shared environment is
left alone), and dpcore's registry is rebuilt so it discovers the entry point.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

from dpcore.registry import reset_registry

ROOT = Path(__file__).resolve().parents[1]


def _installed() -> bool:
    try:
        md.distribution("dpcore-lowrank")
    except md.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="session", autouse=True)
def lowrank_installed(tmp_path_factory: pytest.TempPathFactory):
    added = None
    if not _installed():
        target = tmp_path_factory.mktemp("site")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
             "--no-index", "--target", str(target), str(ROOT)],
            check=True,
        )  # fmt: skip
        sys.path.insert(0, str(target))
        added = str(target)
    reset_registry()
    yield
    if added is not None:
        sys.path.remove(added)
        for name in [m for m in sys.modules if m.startswith("dpcore_lowrank")]:
            del sys.modules[name]
    reset_registry()
