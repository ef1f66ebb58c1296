"""The wrapped model passes isinstance checks of the user's class; wrap_model=False
returns the very object."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcore
from dpcore.wrap import PrivateModule


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.note = "kept"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _private(wrap: bool):  # type: ignore[no-untyped-def]
    net = Net()
    data = TensorDataset(torch.randn(4, 3), torch.randn(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = dpcore.PrivacyEngine(accountant="rdp").make_private(
        module=net, optimizer=opt, data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="bk", wrap_model=wrap,
    )  # fmt: skip
    return net, out[0]


def test_wrapped_model_is_an_instance_of_the_users_class() -> None:
    net, private = _private(True)
    assert isinstance(private, Net) and isinstance(private, PrivateModule)
    assert type(private) is PrivateModule and private.unwrap() is net
    assert private.note == "kept" and private.fc is net.fc
    assert list(private.state_dict()) == ["fc.weight", "fc.bias"]


def test_wrap_model_false_returns_the_same_object() -> None:
    net, private = _private(False)
    assert private is net
