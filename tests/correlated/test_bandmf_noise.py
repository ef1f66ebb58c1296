"""The ``bandmf`` noise plugin: decorrelation, prefix RMSE, state, options."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy import stats

from dpcore.correlated import expected_prefix_rmse, strategy_matrix
from dpcore.errors import CheckpointError, ConfigError, PrivacyEngineError
from dpcore.registry import get_registry
from dpcore.rng import make_generator, standard_normal


def bandmf(**options):
    return get_registry().create("noise", "bandmf", options)


def emit(noise, steps: int, std: float, seed: int, shapes=None) -> dict[str, np.ndarray]:
    """Noise emitted for zero gradients: {name: array[steps, numel]} (float64)."""
    shapes = shapes or {"w": (20, 10), "b": (10,)}
    gen = make_generator(seed, "noise")
    out: dict[str, list[np.ndarray]] = {k: [] for k in shapes}
    for _ in range(steps):
        grads = {k: torch.zeros(s) for k, s in shapes.items()}
        noise.add_noise(grads, std=std, generator=gen)
        for k, g in grads.items():
            out[k].append(g.flatten().double().numpy())
    return {k: np.array(v) for k, v in out.items()}


def looks_iid_normal(w: np.ndarray, std: float, max_lag: int) -> bool:
    """KS against N(0, std^2) and no lag-1..max_lag autocorrelation along axis 0."""
    u = w / std
    if stats.kstest(u.ravel(), "norm").pvalue < 1e-4:
        return False
    steps, width = u.shape
    for lag in range(1, max_lag + 1):
        r = np.mean(u[lag:] * u[:-lag])  # mean 0, variance 1 under the null
        if abs(r) > 4.5 / np.sqrt((steps - lag) * width):
            return False
    return True


def decorrelated(x: np.ndarray, coefs) -> np.ndarray:
    return strategy_matrix(coefs, x.shape[0]) @ x


@pytest.mark.parametrize(
    "options",
    [{"bands": 4}, {"bands": 8, "coefs": "optimized", "horizon": 64}, {"coefs": [1.0, 0.9, 0.1]}],
)
def test_noise_multiplied_back_by_C_is_iid_gaussian(options) -> None:
    std, steps = 0.7, 64
    noise = bandmf(**options)
    x = emit(noise, steps, std, seed=3)["w"]
    assert looks_iid_normal(decorrelated(x, noise.coefs), std, noise.bands + 2)
    # the test has power: the raw stream is correlated, and wrong scales are rejected
    assert not looks_iid_normal(
        x, std * np.linalg.norm(x) / np.linalg.norm(decorrelated(x, noise.coefs)), noise.bands + 2
    )
    for scale in (2 / 3, 3 / 2):
        wrong = emit(bandmf(**options), steps, std * scale, seed=3)["w"]
        assert not looks_iid_normal(decorrelated(wrong, noise.coefs), std, noise.bands + 2)


@pytest.mark.parametrize(
    "options", [{"bands": 8}, {"bands": 8, "coefs": "optimized", "horizon": 48}, {"bands": 1}]
)
def test_prefix_sum_rmse_over_200_seeds_matches_prediction(options) -> None:
    std, steps = 1.3, 48
    squares = []
    for seed in range(200):
        noise = bandmf(**options)
        x = emit(noise, steps, std, seed, shapes={"w": (25,)})["w"]
        squares.append(np.cumsum(x, axis=0) ** 2)
    empirical = float(np.sqrt(np.mean(squares)))
    predicted = expected_prefix_rmse(noise.coefs, steps, std)
    assert empirical == pytest.approx(predicted, rel=0.05)


def test_one_band_is_plain_gaussian_draws_bit_for_bit() -> None:
    gen_a, gen_b = make_generator(5, "noise"), make_generator(5, "noise")
    noise = bandmf(bands=1)
    for _ in range(3):
        grads = {"a": torch.randn(4, 3), "b": torch.randn(7)}
        expected = {k: v.clone() for k, v in grads.items()}
        noise.add_noise(grads, std=0.37, generator=gen_a)
        for k, v in expected.items():
            v.add_(standard_normal(v.shape, generator=gen_b), alpha=0.37)
            assert torch.equal(grads[k], v)


def test_one_band_is_bit_identical_to_gaussian_plugin() -> None:
    registry = get_registry()
    if "gaussian" not in registry.names("noise"):
        pytest.skip("gaussian noise not registered yet")
    gaussian = registry.create("noise", "gaussian", {})
    assert gaussian.min_separation == 1
    a, b = emit(bandmf(bands=1), 5, 0.9, seed=11), emit(gaussian, 5, 0.9, seed=11)
    for k in a:
        assert np.array_equal(a[k], b[k])


def test_resume_mid_run_is_bit_exact() -> None:
    shapes = {"w": (6, 5), "b": (5,)}
    full = emit(bandmf(bands=6), 20, 0.5, seed=2, shapes=shapes)

    gen = make_generator(2, "noise")
    first = bandmf(bands=6)
    for _ in range(9):
        first.add_noise({k: torch.zeros(s) for k, s in shapes.items()}, std=0.5, generator=gen)
    buf = io.BytesIO()
    torch.save({"noise": first.state_dict(), "gen": gen.get_state()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed, gen2 = bandmf(bands=6), torch.Generator()
    resumed.load_state_dict(state["noise"])
    gen2.set_state(state["gen"])
    assert resumed.step == 9
    for t in range(9, 20):
        grads = {k: torch.zeros(s) for k, s in shapes.items()}
        resumed.add_noise(grads, std=0.5, generator=gen2)
        for k in shapes:
            assert np.array_equal(grads[k].flatten().double().numpy(), full[k][t])


def test_state_refuses_other_coefficients_and_parameter_changes() -> None:
    noise = bandmf(bands=3)
    noise.add_noise({"w": torch.zeros(3)}, std=1.0, generator=torch.Generator())
    with pytest.raises(CheckpointError, match="same `bands` and `coefs`"):
        bandmf(bands=4).load_state_dict(noise.state_dict())
    with pytest.raises(PrivacyEngineError, match="parameters"):
        noise.add_noise({"v": torch.zeros(3)}, std=1.0, generator=torch.Generator())


def test_buffers_are_float32_for_low_precision_gradients() -> None:
    noise = bandmf(bands=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = {"w": torch.zeros(8, dtype=torch.bfloat16)}
        noise.add_noise(grads, std=1.0, generator=gen)
        assert grads["w"].dtype == torch.bfloat16
    history = noise.state_dict()["history"]["w"]
    assert len(history) == 2 and all(t.dtype == torch.float32 for t in history)


def test_min_separation_and_options() -> None:
    assert bandmf(bands=5).min_separation == 5
    assert bandmf(coefs=[1, 0.5]).min_separation == 2
    with pytest.raises(ConfigError, match="bands"):
        get_registry().validate_options("noise", "bandmf", {})
    with pytest.raises(ConfigError, match="bandz"):
        get_registry().validate_options("noise", "bandmf", {"bandz": 3})
    with pytest.raises(ConfigError, match="agree"):
        get_registry().validate_options("noise", "bandmf", {"bands": 3, "coefs": [1, 0.5]})
    info = get_registry().get("noise", "bandmf")
    assert "(bands - 1)" in info.details and "float32" in info.details


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_one_band_matches_gaussian_in_every_dtype(dtype) -> None:
    registry = get_registry()
    if "gaussian" not in registry.names("noise"):
        pytest.skip("gaussian noise not registered yet")
    grads_a = {"w": torch.ones(9, dtype=dtype), "b": torch.ones(3, dtype=dtype)}
    grads_b = {k: v.clone() for k, v in grads_a.items()}
    bandmf(bands=1).add_noise(grads_a, std=0.3, generator=make_generator(1, "noise"))
    registry.create("noise", "gaussian", {}).add_noise(
        grads_b, std=0.3, generator=make_generator(1, "noise")
    )
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k])


def test_checkpoint_coefficients_within_rounding_are_adopted() -> None:
    noise = bandmf(bands=3, coefs="optimized", horizon=30)
    state = noise.state_dict()
    state["coefs"] = [c + 1e-9 for c in state["coefs"]]  # another machine's last bits
    resumed = bandmf(bands=3, coefs="optimized", horizon=30)
    resumed.load_state_dict(state)
    assert resumed.coefs == state["coefs"]


@pytest.mark.parametrize("options", [{"bands": 6}, {"coefs": [3.0, -1.0, 0.5]}])
def test_plugin_emits_the_dense_solve_of_its_own_draws(options) -> None:
    from scipy.linalg import solve_triangular

    noise, steps, std = bandmf(**options), 30, 0.8
    emitted = emit(noise, steps, std, seed=4, shapes={"w": (9,), "b": (2,)})
    replay = make_generator(4, "noise")
    drawn: dict[str, list[np.ndarray]] = {"w": [], "b": []}
    for _ in range(steps):
        for name, shape in (("w", (9,)), ("b", (2,))):
            drawn[name].append((standard_normal(shape, generator=replay) * std).double().numpy())
    C = strategy_matrix(noise.coefs, steps)
    for name in drawn:
        dense = solve_triangular(C, np.array(drawn[name]), lower=True)
        np.testing.assert_allclose(emitted[name], dense, rtol=1e-4, atol=1e-5)
