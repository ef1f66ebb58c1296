"""EngineConfig: TOML/dict loading, plugin-option validation, schema."""

from __future__ import annotations

import types

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

import dpcore.registry as registry_module
from dpcore.config import EngineConfig, config_schema
from dpcore.hookspecs import HOOK_FOR_KIND, hookimpl
from dpcore.registry import Registry


class PRVOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps_error: float = 0.01


def _plugin():
    names = {
        "grad_sampler": ["hooks", "bk"],
        "clipper": ["flat"],
        "noise": ["gaussian"],
        "sampler": ["poisson"],
        "accountant": ["prv", "rdp"],
    }
    module = types.SimpleNamespace()
    for kind, ns in names.items():

        def hook(register, ns=ns, kind=kind):
            for n in ns:
                register(
                    n, object, options=PRVOptions if n == "prv" else None, description=f"{kind} {n}"
                )

        setattr(module, HOOK_FOR_KIND[kind], hookimpl(hook))
    return module


@pytest.fixture
def registry(monkeypatch):
    reg = Registry()
    reg.load_plugin(_plugin, provider="test", entry_point="t", module_name="t")
    monkeypatch.setattr(registry_module, "_registry", reg)
    return reg


def test_toml_round_trip(registry, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "noise_multiplier = 1.1\nmax_grad_norm = 1.0\ndelta = 1e-5\nseed = 0\n"
        'grad_sampler = { name = "bk" }\naccountant = { name = "prv", eps_error = 0.05 }\n'
        "[train]\nepochs = 3\n"
    )
    cfg = EngineConfig.from_toml(path)
    assert cfg.grad_sampler.name == "bk"
    assert cfg.accountant.options == {"eps_error": 0.05}
    assert cfg.component_options("accountant") == {"eps_error": 0.05}
    assert cfg.component_options("clipper") == {}


def test_component_shorthand(registry):
    cfg = EngineConfig.from_dict({"noise_multiplier": 1.0, "accountant": "rdp"})
    assert cfg.accountant.name == "rdp"


def test_unknown_top_level_key(registry):
    with pytest.raises(ValidationError, match="noise_multiplyer"):
        EngineConfig.from_dict({"noise_multiplyer": 1.0})


def test_plugin_option_typo_names_plugin_field(registry):
    with pytest.raises(ValidationError) as exc:
        EngineConfig.from_dict(
            {"noise_multiplier": 1.0, "accountant": {"name": "prv", "eps_eror": 1}}
        )
    msg = str(exc.value)
    assert "accountant: invalid options for accountant 'prv'" in msg
    assert "accountant.eps_eror: Extra inputs are not permitted" in msg
    assert "Its options are: eps_error" in msg


def test_unknown_plugin_lists_known(registry):
    with pytest.raises(ValidationError) as exc:
        EngineConfig.from_dict({"noise_multiplier": 1.0, "accountant": "rpd"})
    assert "unknown accountant 'rpd'. Did you mean 'rdp'?" in str(exc.value)
    assert "Installed accountant plugins: prv, rdp" in str(exc.value)


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, "exactly one of noise_multiplier and target_epsilon"),
        (
            {"noise_multiplier": 1.0, "target_epsilon": 3.0, "epochs": 2},
            "exactly one of noise_multiplier and target_epsilon",
        ),
        ({"target_epsilon": 3.0}, "target_epsilon needs epochs"),
        ({"noise_multiplier": 1.0, "max_grad_norm": -1.0}, "max_grad_norm must be positive"),
        ({"noise_multiplier": 1.0, "delta": 2.0}, "less than 1"),
        ({"noise_multiplier": "lots"}, "valid number"),
    ],
)
def test_invalid_values(registry, data, message):
    with pytest.raises(ValidationError, match=message):
        EngineConfig.from_dict(data)


def test_schema_lists_installed_plugins_and_their_options(registry):
    schema = config_schema()
    text = str(schema)
    assert "'prv'" in text and "'rdp'" in text and "eps_error" in text
    assert schema["additionalProperties"] is False
