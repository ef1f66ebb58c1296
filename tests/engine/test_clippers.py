"""Clippers: the bound, the sensitivity, and adaptive clipping's private update."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpcore.errors import ConfigError
from dpcore.registry import get_registry

NAMES = ["a.weight", "a.bias", "b.weight"]


def make(name, max_grad_norm=1.0, **options):
    return get_registry().create(
        "clipper", name, options, max_grad_norm=max_grad_norm, parameter_names=NAMES
    )


sq_norm_dicts = st.lists(
    st.tuples(*[st.floats(0, 1e6, allow_nan=False) for _ in NAMES]), min_size=0, max_size=8
).map(
    lambda rows: {
        n: torch.tensor([r[i] for r in rows], dtype=torch.float32) for i, n in enumerate(NAMES)
    }
)


def contribution_norms(sq, factors):
    total = sum(factors[n].double() ** 2 * sq[n].double() for n in sq)
    return total.sqrt() if isinstance(total, torch.Tensor) else torch.zeros(0)


@pytest.mark.parametrize(
    "name,bound,options",
    [
        ("flat", 0.7, {}),
        ("automatic", 0.7, {}),
        ("adaptive", 0.7, {}),
        ("per_layer", [0.1, 0.2, 0.3], {}),
        ("per_layer", 1.0, {}),
        ("per_layer", [0.5, 2.0], {"groups": [["a.*"], ["*"]]}),
    ],
)
@given(sq=sq_norm_dicts)
@settings(max_examples=60, deadline=None)
def test_no_sample_exceeds_the_sensitivity(name, bound, options, sq):
    clipper = make(name, bound, **options)
    factors = clipper.clip_factors(sq)
    assert set(factors) == set(sq)
    norms = contribution_norms(sq, factors)
    assert bool((norms <= clipper.sensitivity() * (1 + 1e-5)).all())
    assert all(bool((f >= 0).all()) for f in factors.values())


def test_flat_leaves_small_gradients_alone():
    factors = make("flat", 10.0).clip_factors({n: torch.tensor([1.0, 400.0]) for n in NAMES})
    assert factors["a.weight"][0] == pytest.approx(1.0, rel=1e-5)
    assert factors["a.weight"][1] == pytest.approx(10.0 / math.sqrt(1200.0), rel=1e-5)


def test_per_layer_sensitivity_is_the_combined_bound():
    assert make("per_layer", [3.0, 4.0, 12.0]).sensitivity() == pytest.approx(13.0)
    assert make("per_layer", 2.0).sensitivity() == pytest.approx(2.0)  # split evenly
    with pytest.raises(ConfigError, match="3 groups"):
        make("per_layer", [1.0, 2.0])
    with pytest.raises(ConfigError, match="matches no group"):
        make("per_layer", [1.0], groups=[["a.*"]])


def test_automatic_normalises_every_sample():
    clipper = make("automatic", 2.0, stability=0.01)
    f = clipper.clip_factors({n: torch.tensor([1e-4, 3.0, 3e4]) for n in NAMES})["a.weight"]
    norms = torch.tensor([1e-4, 3.0, 3e4]).mul(3).sqrt()
    torch.testing.assert_close(f, 2.0 / (norms + 0.01))


def test_single_bound_clippers_refuse_lists():
    with pytest.raises(ConfigError, match="per_layer"):
        make("flat", [1.0, 2.0])


def test_adaptive_noise_split_composes_to_the_configured_sigma():
    clipper = make("adaptive", 1.0, count_noise_std=2.0)
    sigma = 1.3
    sigma_grad = clipper.gradient_noise_multiplier(sigma)
    # Gaussian mechanisms compose as 1/σ² adds up: gradient (sens 1) + count (sens 1/2, std σ_b)
    assert sigma_grad**-2 + (2 * 2.0) ** -2 == pytest.approx(sigma**-2)
    assert sigma_grad > sigma
    with pytest.raises(ConfigError, match="count_noise_std"):
        make("adaptive", 1.0, count_noise_std=0.5).gradient_noise_multiplier(1.3)
    default = make("adaptive", 1.0)
    assert default.gradient_noise_multiplier(1.0) == pytest.approx((1 - 1 / 100) ** -0.5)


def test_adaptive_bound_moves_towards_the_target_quantile():
    torch.manual_seed(0)
    norms = torch.distributions.LogNormal(0.0, 0.5).sample((400,))  # median 1.0
    sq = {"a.weight": norms**2, "a.bias": torch.zeros(400), "b.weight": torch.zeros(400)}
    for start in (0.05, 20.0):
        clipper = make(
            "adaptive", start, target_unclipped_quantile=0.5, clipbound_learning_rate=0.3
        )
        clipper.gradient_noise_multiplier(1.0)
        gen = torch.Generator().manual_seed(1)
        for _ in range(60):
            clipper.clip_factors(sq)
            clipper.end_step(expected_batch_size=400, generator=gen)
        assert clipper.max_grad_norm == pytest.approx(1.0, rel=0.15)


def test_adaptive_update_uses_the_noisy_count():
    clipper = make(
        "adaptive",
        1.0,
        count_noise_std=3.0,
        clipbound_learning_rate=1.0,
        target_unclipped_quantile=0.5,
    )
    clipper.gradient_noise_multiplier(1.0)
    sq = {n: torch.zeros(10) for n in NAMES}  # all 10 unclipped: centred count = +5
    clipper.clip_factors(sq)
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(1, generator=torch.Generator().manual_seed(7)).double().item()
    clipper.end_step(expected_batch_size=10, generator=gen)
    fraction = (5 + 3.0 * z + 5) / 10
    assert clipper.max_grad_norm == pytest.approx(math.exp(-(fraction - 0.5)), rel=1e-6)
    state = clipper.state_dict()
    again = make("adaptive", 1.0)
    again.load_state_dict(state)
    assert again.max_grad_norm == clipper.max_grad_norm


def test_adaptive_statistics_can_be_reduced_over_ranks():
    clipper = make("adaptive", 1.0)
    clipper.clip_factors({n: torch.zeros(4) for n in NAMES})  # +2
    clipper.all_reduce_statistics(lambda t: t.mul_(3))  # as if 3 identical ranks
    assert clipper.state_dict()["centred_count"] == pytest.approx(6.0)
