"""Broken on purpose: plugins that claim a privacy guarantee and do not deliver it.

They exist so that the tests of ``dpcore audit`` can show that an audit catches
them, exactly as it would catch a third-party plugin with the same bug. They are
written like any third-party plugin: only dpcore's public protocols and hooks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dpcore.hookspecs import Register, hookimpl
from dpcore.rng import standard_normal


class NonClippingClipper:
    """Claims sensitivity C (like ``flat``) but lets every gradient through unclipped."""

    def __init__(
        self, *, max_grad_norm: float | Sequence[float], parameter_names: Sequence[str]
    ) -> None:
        bound = max_grad_norm if isinstance(max_grad_norm, (int, float)) else max(max_grad_norm)
        self.max_grad_norm = float(bound)

    def clip_factors(self, sq_norms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: torch.ones_like(v) for name, v in sq_norms.items()}

    def sensitivity(self) -> float:
        return self.max_grad_norm

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        return noise_multiplier

    def end_step(self, *, expected_batch_size: float, generator: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class ScaledGaussianNoise:
    """Gaussian noise at ``scale`` times the requested standard deviation."""

    min_separation = 1

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def add_noise(
        self, grads: dict[str, Tensor], *, std: float, generator: torch.Generator | None
    ) -> None:
        for g in grads.values():
            z = standard_normal(g.shape, generator=generator, device=g.device)
            g.add_(z.to(g.dtype) * (std * self.scale))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def no_noise() -> ScaledGaussianNoise:
    """Adds no noise at all, whatever it is asked."""
    return ScaledGaussianNoise(0.0)


def half_noise() -> ScaledGaussianNoise:
    """Adds half the noise it is asked for."""
    return ScaledGaussianNoise(0.5)


class DoubleRateSampler:
    """Poisson sampling at twice the rate it reports to the accountant."""

    min_separation = 1
    dp_exact = True

    def __init__(self, *, num_samples: int, sample_rate: float, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
        from dpcore.registry import get_registry

        self.sample_rate = float(sample_rate)
        self.inner = get_registry().create(
            "sampler", "poisson", {"steps_per_epoch": max(1, round(1 / sample_rate))},
            num_samples=num_samples, sample_rate=min(1.0, 2 * sample_rate),
            generator=generator, rank=rank, world_size=world_size,
        )  # fmt: skip

    def __iter__(self) -> Any:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


class OptimisticAccountant:
    """Reports a tenth of the epsilon that ``rdp`` computes."""

    def __init__(self) -> None:
        from dpcore.registry import get_registry

        self.inner = get_registry().create("accountant", "rdp")

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return self.inner.history

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        self.inner.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)

    def get_epsilon(self, delta: float) -> float:
        return self.inner.get_epsilon(delta) / 10

    def __len__(self) -> int:
        return len(self.inner)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


@hookimpl
def dpcore_register_samplers(register: Register) -> None:
    register(
        "faulty_double_rate",
        DoubleRateSampler,
        description="BROKEN: samples at 2x its rate (tests only)",
    )


@hookimpl
def dpcore_register_accountants(register: Register) -> None:
    register(
        "faulty_optimistic",
        OptimisticAccountant,
        description="BROKEN: reports epsilon / 10 (tests only)",
    )


@hookimpl
def dpcore_register_clippers(register: Register) -> None:
    register("faulty_no_clip", NonClippingClipper, description="BROKEN: never clips (tests only)")


@hookimpl
def dpcore_register_noise_mechanisms(register: Register) -> None:
    register("faulty_no_noise", no_noise, description="BROKEN: adds no noise (tests only)")
    register(
        "faulty_half_noise", half_noise, description="BROKEN: adds half the noise (tests only)"
    )
