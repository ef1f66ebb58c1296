"""Every distribution under plugins/ installs with pip and is discovered through the
`dpcore` entry-point group, exactly as a third party's would be."""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

import pytest
import tomllib

from dpcore.registry import Registry, get_registry
from helpers import entry_points_in, pip_install_into

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = sorted(p for p in (ROOT / "plugins").glob("*") if (p / "pyproject.toml").is_file())


def _project(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())["project"]


@pytest.mark.plugins
@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=lambda p: p.name)
def test_installs_and_is_discovered(dist, tmp_path, monkeypatch):
    project = _project(dist)
    target = tmp_path / "site"
    pip_install_into(target, dist)
    monkeypatch.syspath_prepend(str(target))
    eps = entry_points_in(target)
    assert eps, f"{dist.name} declares no entry point in group 'dpcore'"
    for mod in list(sys.modules):  # import the freshly installed copy
        if any(mod.split(".")[0] == ep.value.split(".")[0].split(":")[0] for ep in eps):
            sys.modules.pop(mod)
    reg = Registry.from_entry_points(eps)
    failed = {f.entry_point: f.error for f in reg.failures}
    # an optional heavy dependency may be missing; then the failure must say so clearly
    for name, error in failed.items():
        assert "No module named" in (error or ""), f"{name} failed: {error}"
    if not failed:
        infos = reg.entries()
        assert infos, f"{dist.name} registered nothing"
        assert {i.provider for i in infos} == {project["name"]}
        assert {i.version for i in infos} == {project["version"]}


@pytest.mark.plugins
@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=lambda p: p.name)
def test_installed_in_environment_is_listed(dist):
    """In CI the plugins are pip-installed into the environment: they must show up."""
    name = _project(dist)["name"]
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        pytest.skip(f"{name} is not installed in this environment (CI installs it)")
    providers = {i.provider for i in get_registry().describe()}
    assert name in providers
