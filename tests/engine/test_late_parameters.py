"""A trainable parameter the grad sampler does not cover is refused at step, by name:
created, replaced or unfrozen after make_private (e.g. a lazily built adapter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcore
from dpcore.errors import PrivacyEngineError


def _run(mode: str, change, after_steps: int = 0, model: nn.Module | None = None) -> None:  # type: ignore[no-untyped-def]
    """Train ``model`` (3 inputs, 2 outputs) privately; ``change`` it before step
    ``after_steps``."""
    torch.manual_seed(0)
    if model is None:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        model[0].bias.requires_grad_(False)
    data = TensorDataset(
        torch.randn(8 * (after_steps + 1), 3), torch.randn(8 * (after_steps + 1), 2)
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = dpcore.PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, seed=0,
    )  # fmt: skip
    for i, (x, y) in enumerate(loader):
        if i == after_steps:
            change(model)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _replace(model: nn.Module) -> None:
    model[2].weight = nn.Parameter(torch.zeros_like(model[2].weight))


def _replace_slot(model: nn.Module) -> None:
    """Past the module API, as accelerate's ``set_module_tensor_to_device`` does."""
    model[2]._parameters["weight"] = nn.Parameter(torch.zeros_like(model[2].weight))


def _unfreeze(model: nn.Module) -> None:
    model[0].bias.requires_grad_(True)


@pytest.mark.parametrize("mode", ["hooks", "bk", "ghost", "functorch"])
def test_replaced_parameter_is_refused_by_name(mode: str) -> None:
    with pytest.raises(PrivacyEngineError, match=r"'2\.weight'"):
        _run(mode, _replace)


@pytest.mark.parametrize("mode", ["hooks", "bk", "ghost", "functorch"])
@pytest.mark.parametrize("after_steps", [0, 2])
def test_parameter_replaced_in_its_slot_is_refused_by_name(mode: str, after_steps: int) -> None:
    with pytest.raises(PrivacyEngineError, match=r"'2\.weight'"):
        _run(mode, _replace_slot, after_steps)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_replaced_after_some_steps_is_refused_by_name(mode: str) -> None:
    with pytest.raises(PrivacyEngineError, match=r"'2\.weight'"):
        _run(mode, _replace, after_steps=2)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
@pytest.mark.parametrize("after_steps", [0, 2])
def test_parameter_unfrozen_later_is_refused_by_name(mode: str, after_steps: int) -> None:
    with pytest.raises(PrivacyEngineError, match=r"'0\.bias'"):
        _run(mode, _unfreeze, after_steps)


def _add_slot(model: nn.Module) -> None:
    """A new name written straight into a module's table: no registration hook sees it."""
    model[2]._parameters["scale"] = nn.Parameter(torch.ones(2))


@pytest.mark.parametrize("mode", ["hooks", "bk", "ghost", "functorch"])
@pytest.mark.parametrize("after_steps", [0, 2])
def test_parameter_added_past_the_module_api_is_refused_by_name(
    mode: str, after_steps: int
) -> None:
    with pytest.raises(PrivacyEngineError, match=r"'2\.scale'"):
        _run(mode, _add_slot, after_steps)


@pytest.mark.parametrize("mode", ["hooks", "bk", "ghost", "functorch"])
@pytest.mark.parametrize("after_steps", [0, 2])
def test_module_added_past_the_module_api_is_refused_by_name(mode: str, after_steps: int) -> None:
    extra = nn.Linear(2, 2)  # built before make_private: its registrations are long past

    def add(model: nn.Module) -> None:
        model[2]._modules["extra"] = extra

    with pytest.raises(PrivacyEngineError, match=r"'2\.extra\.weight'"):
        _run(mode, add, after_steps)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_empty_slot_filled_after_some_steps_is_refused_by_name(mode: str) -> None:
    def fill(model: nn.Module) -> None:
        model[0]._parameters["bias"] = nn.Parameter(torch.zeros(2))

    with pytest.raises(PrivacyEngineError, match=r"'0\.bias'"):
        _run(mode, fill, 2, model=nn.Sequential(nn.Linear(3, 2, bias=False)))


def test_unchanged_model_steps() -> None:
    _run("bk", lambda model: None)


def test_noise_follows_a_model_moved_after_make_private() -> None:
    """The noise generator was made on the model's device at make_private; after a move
    (.cuda()) the same stream is drawn on the generator's device and moved."""
    from dpcore.rng import standard_normal

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    moved = standard_normal((4, 2), generator=g1, device="meta")
    assert moved.device.type == "meta" and moved.dtype == torch.float32
    standard_normal((4, 2), generator=g2, device="cpu")
    assert torch.equal(g1.get_state(), g2.get_state())  # the same draw was consumed
