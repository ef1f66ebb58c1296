"""What every built-in accountant shares: the protocol, the history, state and resume."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from dpcore.accounting import create_accountant
from dpcore.errors import ConfigError
from dpcore.protocols import Accountant
from dpcore.registry import get_registry

NAMES = ["rdp", "gdp", "prv"]


@pytest.fixture(autouse=True)
def _quiet_gdp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_registered_with_options_and_descriptions():
    registry = get_registry()
    for name in NAMES:
        info = registry.get("accountant", name)
        assert info.provider == "dpcore" and info.description and info.options is not None
        assert info.options.model_config.get("extra") == "forbid"


@pytest.mark.parametrize("name", NAMES)
def test_implements_the_protocol_and_merges_equal_segments(name):
    acc = create_accountant(name)
    assert isinstance(acc, Accountant)
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=4)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=0)
    assert acc.history == [(1.0, 0.01, 5)] and len(acc) == 5


@pytest.mark.parametrize("name", NAMES)
def test_state_is_plain_data_and_resume_is_exact(name):
    straight = create_accountant(name)
    straight.step(noise_multiplier=1.2, sample_rate=0.02, steps=300)

    first = create_accountant(name)
    first.step(noise_multiplier=1.2, sample_rate=0.02, steps=120)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = create_accountant(name)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(180):
        resumed.step(noise_multiplier=1.2, sample_rate=0.02)
    assert resumed.history == straight.history
    assert resumed.get_epsilon(1e-5) == straight.get_epsilon(1e-5)
    # and it is not the sum of the two parts' epsilons (composition is sub-additive)
    second = create_accountant(name)
    second.step(noise_multiplier=1.2, sample_rate=0.02, steps=180)
    assert straight.get_epsilon(1e-5) < first.get_epsilon(1e-5) + second.get_epsilon(1e-5)


@pytest.mark.parametrize(
    "name, options",
    [
        ("prv", {"eps_error": -1}),
        ("prv", {"delta_eror": 1e-8}),
        ("rdp", {"orders": [0.5]}),
        ("gdp", {"warn": "sometimes"}),
    ],
)
def test_bad_options_name_the_field(name, options):
    with pytest.raises(ConfigError, match=f"accountant {name!r}"):
        create_accountant(name, **options)


@pytest.mark.parametrize("name", NAMES)
def test_numpy_scalars_are_plain_numbers_in_the_history(name):
    import numpy as np

    acc = create_accountant(name)
    acc.step(noise_multiplier=np.float32(1.5), sample_rate=np.float64(0.01), steps=np.int64(3))
    assert acc.history == [(1.5, 0.01, 3)]
    assert all(type(x) in (float, int) for x in acc.history[0])
