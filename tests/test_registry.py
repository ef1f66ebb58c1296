"""Plugin discovery, conflicts, failure isolation and resolution errors."""

from __future__ import annotations

import importlib.metadata as md
import sys

import pytest
from pydantic import BaseModel, ConfigDict

from dpcore.errors import (
    ConfigError,
    PluginConflictError,
    PluginLoadError,
    UnknownPluginError,
)
from dpcore.protocols import KINDS
from dpcore.registry import Registry, get_registry
from helpers import entry_points_in, pip_install_into, write_distribution

GOOD = """
from pydantic import BaseModel, ConfigDict
from dpcore.hookspecs import hookimpl

class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = 1.0

class Fancy:
    \"\"\"A fancy test accountant.\"\"\"
    def __init__(self, scale):
        self.scale = scale

@hookimpl
def dpcore_register_accountants(register):
    register("fancy", Fancy, options=Options)
"""

BROKEN = """
import this_module_does_not_exist_anywhere
"""


def builtin_entry_points() -> list[md.EntryPoint]:
    return [ep for ep in md.entry_points(group="dpcore") if ep.dist and ep.dist.name == "dpcore"]


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install throwaway distributions into a private target directory, for real."""

    def install(*dists: tuple[str, str, dict[str, str], str]):
        target = tmp_path / "site"
        sources = [write_distribution(tmp_path / "src", *d) for d in dists]
        pip_install_into(target, *sources)
        monkeypatch.syspath_prepend(str(target))
        for d in dists:
            sys.modules.pop(d[1], None)
        return entry_points_in(target)

    return install


def test_builtins_are_discovered_through_entry_points():
    names = {ep.name for ep in builtin_entry_points()}
    assert {"builtin_accountants", "builtin_grad_samplers", "builtin_clippers"} <= names
    reg = get_registry()
    assert not [f for f in reg.failures if f.provider == "dpcore"], reg.failures


def test_third_party_plugin_is_discovered_with_provider_and_options(installed):
    eps = installed(("dpcore-fancy", "dpcore_fancy", {"fancy": "dpcore_fancy"}, GOOD))
    reg = Registry.from_entry_points(eps)
    info = reg.get("accountant", "fancy")
    assert (info.provider, info.version, info.module) == ("dpcore-fancy", "1.2.3", "dpcore_fancy")
    assert info.description == "A fancy test accountant."
    obj = reg.create("accountant", "fancy", {"scale": 2.5})
    assert obj.scale == 2.5


def test_duplicate_name_from_two_providers_names_both(installed):
    eps = installed(
        ("dpcore-fancy", "dpcore_fancy", {"fancy": "dpcore_fancy"}, GOOD),
        ("dpcore-fancy-clone", "dpcore_fancy_clone", {"fancy_clone": "dpcore_fancy_clone"}, GOOD),
    )
    with pytest.raises(PluginConflictError) as exc:
        Registry.from_entry_points(eps)
    msg = str(exc.value)
    assert "accountant 'fancy' is registered twice" in msg
    assert "dpcore-fancy 1.2.3" in msg and "dpcore-fancy-clone 1.2.3" in msg


def test_broken_plugin_is_isolated_and_reported(installed):
    eps = installed(
        ("dpcore-fancy", "dpcore_fancy", {"fancy": "dpcore_fancy"}, GOOD),
        ("dpcore-broken", "dpcore_broken", {"broken": "dpcore_broken"}, BROKEN),
    )
    reg = Registry.from_entry_points(eps)
    assert reg.names("accountant") == ["fancy"]  # the good one still works
    [failed] = reg.failures
    assert failed.status == "failed" and failed.provider == "dpcore-broken"
    assert failed.error.startswith("ModuleNotFoundError: No module named 'this_module_does_not")
    with pytest.raises(PluginLoadError) as exc:
        reg.get("accountant", "broken")
    assert "failed to load: ModuleNotFoundError" in str(exc.value)
    assert isinstance(exc.value.__cause__, ModuleNotFoundError)


def test_disable_env_blocks_entry_points(installed, monkeypatch):
    eps = installed(("dpcore-fancy", "dpcore_fancy", {"fancy": "dpcore_fancy"}, GOOD))
    monkeypatch.setenv("DPCORE_DISABLE_PLUGINS", "fancy, other")
    reg = Registry.from_entry_points(eps)
    assert reg.names("accountant") == []
    [disabled] = [i for i in reg.describe() if i.status == "disabled"]
    assert disabled.name == "fancy"


def test_unknown_name_lists_known_and_closest():
    reg = Registry()
    reg.load_plugin(
        lambda: _plugin_with("accountant", ["rdp", "prv", "gdp"]),
        provider="p",
        entry_point="e",
        module_name="m",
    )
    with pytest.raises(UnknownPluginError) as exc:
        reg.get("accountant", "rpd")
    assert str(exc.value) == (
        "unknown accountant 'rpd'. Did you mean 'rdp'? Installed accountant plugins: gdp, prv, rdp."
    )


def test_unknown_kind():
    with pytest.raises(UnknownPluginError, match="unknown plugin kind 'acountant'; kinds are: "):
        Registry().names("acountant")


def test_bad_options_name_the_plugin_fields():
    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        eps_error: float = 0.01

    reg = Registry()
    reg.load_plugin(
        lambda: _plugin_with("accountant", ["prv"], Options),
        provider="p",
        entry_point="e",
        module_name="m",
    )
    with pytest.raises(ConfigError) as exc:
        reg.create("accountant", "prv", {"eps_eror": 0.1})
    assert str(exc.value) == (
        "invalid options for accountant 'prv' (p): accountant.eps_eror: Extra inputs are not "
        "permitted. Its options are: eps_error."
    )


def test_every_kind_has_a_hook():
    from dpcore.hookspecs import HOOK_FOR_KIND

    assert set(HOOK_FOR_KIND) == set(KINDS)


def _plugin_with(kind, names, options=None):
    import types

    from dpcore.hookspecs import HOOK_FOR_KIND, hookimpl

    def hook(register):
        for n in names:
            register(n, object, options=options, description=f"{n} test")

    module = types.SimpleNamespace()
    setattr(module, HOOK_FOR_KIND[kind], hookimpl(hook))
    return module
