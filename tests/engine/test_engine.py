"""PrivacyEngine: API, components by name, wrappers, accounting rule, state."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

import dpcore
from dpcore.accounting import create_accountant
from dpcore.config import EngineConfig
from dpcore.errors import (
    ConfigError,
    IncompatiblePluginsError,
    PrivacyEngineError,
    UnknownPluginError,
)

from .conftest import dataset, loader, mlp

pytestmark = pytest.mark.usefixtures("accountant_name")


def _train(model, opt, dl, steps=None):
    done = 0
    for x, y in dl:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        done += 1
        if steps is not None and done == steps:
            break


@pytest.mark.parametrize(
    "clipping",
    [
        "adaptive",
        ("adaptive", {"target_unclipped_quantile": 0.7}),
        {"name": "adaptive", "target_unclipped_quantile": 0.7},
    ],
)
def test_components_by_name_with_options(clipping, accountant_name):
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model = mlp()
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(), 12),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        clipping=clipping,
        grad_sample_mode=("hooks", {"store_grad_sample": False}),
        noise={"name": "gaussian"},
        sampler="poisson",
        seed=0,
    )
    assert type(engine.clipper).__name__ == "AdaptiveClipper"
    expected = 0.5 if clipping == "adaptive" else 0.7
    assert engine.clipper.target_unclipped_quantile == expected
    _train(model, opt, dl)
    assert engine.steps == 4


def test_bad_plugin_name_or_option_is_reported(accountant_name):
    for kw, match in [
        ({"clipping": "flatt"}, "Did you mean 'flat'"),
        ({"clipping": ("adaptive", {"quantile": 0.5})}, "target_unclipped_quantile"),
    ]:
        model = mlp()
        with pytest.raises((ConfigError, UnknownPluginError), match=match):
            dpcore.PrivacyEngine(accountant=accountant_name).make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=loader(dataset(), 12),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                **kw,
            )


def test_wrapped_model_behaves_like_the_original(accountant_name):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()
            self.temperature = 2.0

        def forward(self, x):
            return self.body(x) / self.temperature

        def predict(self, x):
            return self(x).argmax(-1)

    net = Net()
    plain_keys = list(net.state_dict())
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, _opt, _dl = engine.make_private(
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        data_loader=loader(dataset(), 12),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=0,
    )
    assert list(model.state_dict()) == plain_keys
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert model.temperature == 2.0 and model.body is net.body
    x = torch.randn(5, 6)
    assert torch.equal(model.predict(x), net.predict(x))
    fresh = Net()
    fresh.load_state_dict(model.state_dict())
    model.load_state_dict(fresh.state_dict())
    assert model.unwrap() is net and model._module is net


def test_wrap_model_false_returns_the_same_object_and_detach_removes_hooks(accountant_name):
    model = mlp()
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    same, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(), 12),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=0,
        wrap_model=False,
    )
    assert same is model
    _train(model, opt, dl, steps=1)
    engine.detach()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # a plain (non-private) step works again, and the engine can be reused
    x, y = dataset().tensors
    nn.functional.cross_entropy(model(x), y).backward()
    again = dpcore.PrivacyEngine(accountant=accountant_name)
    again.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(), 12),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )


def test_accounting_follows_real_steps(accountant_name):
    model = mlp()
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(48), 12),
        noise_multiplier=1.1,
        max_grad_norm=1.0,
        seed=0,
    )
    assert engine.get_epsilon(1e-5) == 0.0
    _train(model, opt, dl)
    _train(model, opt, dl)
    assert engine.steps == 8
    acc = create_accountant(accountant_name)
    acc.step(noise_multiplier=1.1, sample_rate=0.25, steps=8)
    assert engine.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_shuffle_sampler_warns_that_accounting_is_approximate(accountant_name):
    model = mlp()
    with pytest.warns(UserWarning, match="approximation"):
        _, _, dl = dpcore.PrivacyEngine(accountant=accountant_name).make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(dataset(48), 12),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
    assert [len(b[0]) for b in dl] == [12, 12, 12, 12]


def test_correlated_noise_with_poisson_sampling_is_refused_naming_both(accountant_name):
    model = mlp()
    with pytest.raises(IncompatiblePluginsError, match=r"(?s)bandmf.*poisson"):
        dpcore.PrivacyEngine(accountant=accountant_name).make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(dataset(48), 12),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            noise=("bandmf", {"bands": 4}),
        )


def test_make_private_with_epsilon_spends_the_budget(accountant_name):
    model = mlp()
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, dl = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(48), 12),
        target_epsilon=4.0,
        target_delta=1e-5,
        epochs=2,
        max_grad_norm=1.0,
        seed=0,
    )
    assert opt.noise_multiplier == engine.noise_multiplier > 0
    _train(model, opt, dl)
    _train(model, opt, dl)
    eps = engine.get_epsilon(1e-5)
    assert 4.0 - 0.02 <= eps <= 4.0 + 1e-9


def test_from_config(accountant_name):
    cfg = EngineConfig.from_dict(
        {
            "noise_multiplier": 0.9,
            "max_grad_norm": 0.5,
            "seed": 7,
            "clipper": {"name": "automatic", "stability": 0.1},
            "accountant": {"name": accountant_name},
        }
    )
    engine = dpcore.PrivacyEngine.from_config(cfg)
    model = mlp()
    model, opt, _dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(48), 12),
    )
    assert engine.seed == 7 and opt.noise_multiplier == 0.9
    assert engine.clipper.stability == 0.1 and engine.clipper.max_grad_norm == 0.5
    assert engine.state_dict()["config"]["clipper"] == {"name": "automatic", "stability": 0.1}


def test_from_config_with_a_budget(accountant_name):
    engine = dpcore.PrivacyEngine.from_config(
        {
            "target_epsilon": 3.0,
            "epochs": 1,
            "delta": 1e-5,
            "accountant": accountant_name,
        }
    )
    model = mlp()
    _, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(48), 12),
    )
    assert opt.noise_multiplier > 0


def _run(accountant_name, steps, state=None, clipping="adaptive"):
    model = mlp()
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
        data_loader=loader(dataset(48), 8),
        noise_multiplier=0.8,
        max_grad_norm=0.5,
        seed=5,
        clipping=clipping,
    )
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        engine.load_state_dict(state["engine"])
    done = 0
    while done < steps:
        for x, y in dl:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return engine, model, opt


def test_state_dict_is_plain_data_and_resumes_exactly(accountant_name):
    engine, model, opt = _run(accountant_name, 9)  # mid-epoch (6 steps per epoch)
    state = {
        "engine": engine.state_dict(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
    }
    for key in (
        "format",
        "config",
        "accountant",
        "clipper",
        "noise",
        "sampler",
        "generators",
        "steps",
        "epoch",
        "sample_rate",
        "num_samples",
        "noise_multiplier",
        "world_size",
    ):
        assert key in state["engine"], key
    assert state["engine"]["steps"] == 9 and state["engine"]["epoch"] == 1
    assert state["engine"]["sampler"]["position"] == 3
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    straight, model_a, _ = _run(accountant_name, 20)
    resumed, model_b, _ = _run(accountant_name, 11, state=loaded)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.steps == straight.steps == 20
    assert resumed.clipper.max_grad_norm == straight.clipper.max_grad_norm
    assert resumed.get_epsilon(1e-5) == pytest.approx(straight.get_epsilon(1e-5), rel=1e-12)


def test_state_loaded_before_make_private_is_applied(accountant_name):
    engine, *_ = _run(accountant_name, 3)
    state = engine.state_dict()
    fresh = dpcore.PrivacyEngine(accountant=accountant_name)
    fresh.load_state_dict(state)
    model = mlp()
    fresh.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(48), 8),
        noise_multiplier=0.8,
        max_grad_norm=0.5,
        seed=5,
        clipping="adaptive",
    )
    assert fresh.steps == 3
    assert fresh.get_epsilon(1e-5) == pytest.approx(engine.get_epsilon(1e-5))


def test_make_private_twice_and_rewrapping_are_refused(accountant_name):
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model = mlp()
    _m, o, _d = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(), 12),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    other = dpcore.PrivacyEngine(accountant=accountant_name)
    with pytest.raises(PrivacyEngineError, match="already private"):
        other.make_private(
            module=model,
            optimizer=o,
            data_loader=loader(dataset(), 12),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    with pytest.raises(PrivacyEngineError, match="one PrivacyEngine per"):
        engine.make_private(
            module=mlp(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(dataset(), 12),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_criterion_is_passed_through_for_opacus_ghost_code(accountant_name):
    model = mlp()
    criterion = nn.CrossEntropyLoss()
    out = dpcore.PrivacyEngine(accountant=accountant_name).make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=criterion,
        data_loader=loader(dataset(), 12),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
    )
    assert len(out) == 4 and out[2] is criterion
    model, opt, crit, dl = out
    x, y = next(iter(dl))
    opt.zero_grad()
    crit(model(x), y).backward()
    opt.step()


def test_missing_noise_multiplier_or_bound_is_explained(accountant_name):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    with pytest.raises(PrivacyEngineError, match="noise_multiplier"):
        engine.make_private(
            module=model, optimizer=opt, data_loader=loader(dataset(), 12), max_grad_norm=1.0
        )
    with pytest.raises(PrivacyEngineError, match="max_grad_norm"):
        engine.make_private(
            module=model, optimizer=opt, data_loader=loader(dataset(), 12), noise_multiplier=1.0
        )


def test_adaptive_clipping_is_accounted_at_the_configured_sigma(accountant_name):
    engine, *_ = _run(accountant_name, 2, clipping="adaptive")
    assert engine.accountant.history and all(h[0] == 0.8 for h in engine.accountant.history)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(engine.get_epsilon(1e-5))


def test_empty_batch_detection_follows_batch_first_and_keyword_inputs():
    from dpcore.engine import _is_empty_batch

    assert _is_empty_batch((torch.zeros(0, 3),), {}, True)
    assert not _is_empty_batch((torch.zeros(2, 3),), {}, True)
    assert _is_empty_batch((), {"input_ids": torch.zeros(0, 5, dtype=torch.long)}, True)
    assert _is_empty_batch(((torch.zeros(7, 0, 4), None),), {}, False)  # [T, B, F]
    assert not _is_empty_batch((torch.zeros(7, 2, 4),), {}, False)
    assert not _is_empty_batch(("text", 3), {}, True)


def test_secure_mode_refuses_predictable_randomness(accountant_name):
    model = mlp()
    engine = dpcore.PrivacyEngine(accountant=accountant_name, secure_mode=True)
    with pytest.raises(PrivacyEngineError, match="secure_mode"):
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(dataset(), 12),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            seed=3,
        )
    _, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(), 12),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert opt.noise.secure
