"""get_noise_multiplier: meets its target, is the smallest, works for any accountant plugin."""

from __future__ import annotations

import math
import warnings

import pytest

import dpcore
import dpcore.registry as registry_module
from dpcore.accounting import (
    HistoryAccountant,
    compute_epsilon,
    get_noise_multiplier,
    steps_for_epochs,
)
from dpcore.errors import AccountingError, UnknownPluginError
from dpcore.hookspecs import hookimpl
from dpcore.registry import Registry

Q, STEPS, DELTA = 256 / 60000, 2000, 1e-5


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
@pytest.mark.parametrize("target", [1.0, 4.0])
def test_meets_the_target_and_is_the_smallest(accountant, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gdp's approximation warning
        sigma = dpcore.get_noise_multiplier(
            target_epsilon=target,
            target_delta=DELTA,
            sample_rate=Q,
            steps=STEPS,
            accountant=accountant,
        )

        def eps(s: float) -> float:
            return compute_epsilon(
                noise_multiplier=s, sample_rate=Q, steps=STEPS, delta=DELTA, accountant=accountant
            )

        spent = eps(sigma)
        assert target - 0.01 <= spent <= target
        assert eps(sigma * 0.98) > target  # a little less noise overspends


def test_epochs_are_round_one_over_q_steps_each():
    assert steps_for_epochs(60, 256 / 60000) == 60 * 234
    assert steps_for_epochs(0.5, 0.1) == 5
    a = get_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=0.01, epochs=3, accountant="rdp"
    )
    b = get_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=0.01, steps=300, accountant="rdp"
    )
    assert a == b


def test_accountant_options_are_passed_through_and_validated():
    loose = get_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=0.01, steps=500, eps_error=0.1
    )
    spent = compute_epsilon(
        noise_multiplier=loose, sample_rate=0.01, steps=500, delta=DELTA, eps_error=0.1
    )
    assert 1.99 <= spent <= 2.0
    with pytest.raises(dpcore.errors.ConfigError, match="eps_eror"):
        get_noise_multiplier(
            target_epsilon=2.0, target_delta=DELTA, sample_rate=0.01, steps=500, eps_eror=0.1
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"steps": None}, "exactly one"),
        ({"epochs": 2.0}, "exactly one"),
        ({"epsilon_tolerance": 5.0}, "epsilon_tolerance"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"target_epsilon": 1.0, "target_delta": DELTA, "sample_rate": 0.01, "steps": 100}
    args.update(kwargs)
    with pytest.raises(AccountingError, match=match):
        get_noise_multiplier(**args)


def test_unknown_accountant_lists_the_installed_ones():
    with pytest.raises(UnknownPluginError, match="prv"):
        get_noise_multiplier(
            target_epsilon=1.0, target_delta=DELTA, sample_rate=0.01, steps=10, accountant="pvr"
        )


class LinearAccountant(HistoryAccountant):
    """A toy third-party accountant: epsilon = sum(steps * q) / sigma."""

    name = "linear"

    def get_epsilon(self, delta: float) -> float:
        return sum(n * q / s if s > 0 else math.inf for s, q, n in self.history)


class _ToyPlugin:
    @hookimpl
    def dpcore_register_accountants(self, register):
        register("linear", LinearAccountant, description="toy")


def test_works_for_any_accountant_plugin(monkeypatch):
    reg = Registry.from_entry_points()
    reg.load_plugin(lambda: _ToyPlugin(), provider="toy-dist", entry_point="toy", module_name="toy")
    monkeypatch.setattr(registry_module, "_registry", reg)
    sigma = get_noise_multiplier(
        target_epsilon=2.0,
        target_delta=DELTA,
        sample_rate=0.1,
        steps=100,
        accountant="linear",
        epsilon_tolerance=0.001,
    )
    smallest = 100 * 0.1 / 2.0  # eps(sigma) = 10 / sigma <= 2
    assert smallest <= sigma <= smallest * 2.0 / 1.999
