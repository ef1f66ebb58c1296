"""BandMF through the engine: refusals, the generic accounting rule, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpcore.errors import IncompatiblePluginsError
from dpcore.registry import get_registry

engine_module = pytest.importorskip("dpcore.engine")
PrivacyEngine = engine_module.PrivacyEngine

N, BATCH = 120, 6  # q = 0.05: 20 steps per epoch


def setup(noise, sampler, seed=0, sigma=1.3, accountant="rdp"):
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(N, 5), torch.randint(0, 3, (N,)))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    engine = PrivacyEngine(accountant=accountant)
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=BATCH),
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        noise=noise,
        sampler=sampler,
        seed=seed,
        grad_sample_mode="bk",
    )
    return engine, model, optimizer, loader


def train(model, optimizer, loader, steps: int) -> int:
    done = 0
    while done < steps:
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == steps:
                break
    return done


def dpsgd_epsilon(
    sigma: float, rate: float, steps: int, delta: float = 1e-5, accountant: str = "rdp"
) -> float:
    fresh = get_registry().create("accountant", accountant, {})
    fresh.step(noise_multiplier=sigma, sample_rate=rate, steps=steps)
    return fresh.get_epsilon(delta)


def test_bandmf_with_plain_poisson_is_refused_naming_both_and_the_fix() -> None:
    with pytest.raises(IncompatiblePluginsError) as err:
        setup({"name": "bandmf", "bands": 4}, "poisson")
    message = str(err.value)
    assert "'bandmf'" in message and "'poisson'" in message
    assert "cyclic_poisson" in message and "4" in message


def test_more_bands_than_the_cycle_is_refused() -> None:
    with pytest.raises(IncompatiblePluginsError) as err:
        setup({"name": "bandmf", "bands": 4}, {"name": "cyclic_poisson", "cycle_length": 3})
    message = str(err.value)
    assert "'bandmf'" in message and "'cyclic_poisson'" in message
    assert "4" in message and "3" in message and "cycle length" in message


@pytest.mark.parametrize(
    "bands,cycle,accountant", [(4, None, "rdp"), (3, 5, "rdp"), (1, None, "rdp"), (4, None, "prv")]
)
def test_accounting_equals_dpsgd_with_ceil_n_over_k_steps_at_rate_qk(
    bands, cycle, accountant
) -> None:
    sampler = {"name": "cyclic_poisson"} | ({} if cycle is None else {"cycle_length": cycle})
    engine, model, optimizer, loader = setup(
        {"name": "bandmf", "bands": bands}, sampler, accountant=accountant
    )
    k = cycle or bands
    assert engine.sampler.min_separation == k
    assert engine.sample_rate == pytest.approx(k * BATCH / N)
    assert optimizer.expected_batch_size == pytest.approx(BATCH)
    n = 43  # not a multiple of k: the last partial cycle is accounted too
    train(model, optimizer, loader, n)
    assert len(engine.accountant) == math.ceil(n / k)
    assert engine.get_epsilon(1e-5) == pytest.approx(
        dpsgd_epsilon(1.3, k * BATCH / N, math.ceil(n / k), accountant=accountant), rel=1e-9
    )


def test_one_band_trains_bit_identically_to_gaussian_and_spends_the_same() -> None:
    runs = []
    for noise in ("gaussian", {"name": "bandmf", "bands": 1}):
        engine, model, optimizer, loader = setup(noise, "poisson", seed=7)
        train(model, optimizer, loader, 25)
        runs.append((engine.get_epsilon(1e-5), [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] == pytest.approx(dpsgd_epsilon(1.3, BATCH / N, 25))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_resume_mid_run_is_bit_exact() -> None:
    noise = {"name": "bandmf", "bands": 4, "coefs": "optimized", "horizon": 50}
    sampler = "cyclic_poisson"
    engine, model, optimizer, loader = setup(noise, sampler, seed=3)
    train(model, optimizer, loader, 47)
    reference = [p.detach().clone() for p in model.parameters()]

    engine, model, optimizer, loader = setup(noise, sampler, seed=3)
    train(model, optimizer, loader, 29)  # mid-epoch, mid-cycle
    buf = io.BytesIO()
    torch.save(
        {
            "engine": engine.state_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        buf,
    )
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    engine, model, optimizer, loader = setup(noise, sampler, seed=99)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    engine.load_state_dict(state["engine"])
    train(model, optimizer, loader, 18)
    assert all(torch.equal(a, b) for a, b in zip(reference, model.parameters(), strict=True))
    assert len(engine.accountant) == math.ceil(47 / 4)


def test_make_private_with_epsilon_calibrates_for_the_accounted_events() -> None:
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(N, 5), torch.randint(0, 3, (N,)))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=BATCH),
        target_epsilon=3.0,
        target_delta=1e-5,
        epochs=2,
        max_grad_norm=1.0,
        noise={"name": "bandmf", "bands": 4},
        sampler="cyclic_poisson",
        seed=0,
        grad_sample_mode="bk",
    )
    train(model, optimizer, loader, 2 * len(loader))
    assert len(engine.accountant) == math.ceil(2 * len(loader) / 4)
    assert 3.0 - 0.011 <= engine.get_epsilon(1e-5) <= 3.0 + 1e-9


@pytest.mark.slow
def test_dpcore_train_resumes_bandmf_bit_exactly(tmp_path) -> None:
    from rich.console import Console

    train_module = pytest.importorskip("dpcore.train")
    config = {
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "seed": 5,
        "grad_sampler": {"name": "bk"},
        "noise": {"name": "bandmf", "bands": 3},
        "sampler": {"name": "cyclic_poisson"},
        "accountant": {"name": "rdp"},
        "train": {"lr": 0.5, "batch_size": 256, "checkpoint_every": 1, "epochs": 3},
    }
    quiet = {"console": Console(file=io.StringIO()), "progress": False}
    straight = train_module.train(config, run_dir=tmp_path / "a", **quiet)
    train_module.train(config, run_dir=tmp_path / "b", epochs=2, **quiet)
    resumed = train_module.train(config, run_dir=tmp_path / "b", resume="auto", **quiet)
    assert resumed.steps == straight.steps
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.epsilon == straight.epsilon
