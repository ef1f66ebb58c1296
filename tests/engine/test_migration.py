"""The scenarios of Opacus' 0.x -> 1.x migration guide, written for dpcore.

Each test is what a user migrating from Opacus writes: the same flow, dpcore's
names. The models and data are small stand-ins.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim import SGD
from torch.utils.data import DataLoader, TensorDataset

import dpcore
from dpcore import BatchMemoryManager, ModuleValidator, PrivacyEngine
from dpcore.accounting import create_accountant

pytestmark = pytest.mark.usefixtures("accountant_name")
DELTA = 1e-5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_dataset(n=128, images=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 6, 6, generator=g) if images else torch.randn(n, 8, generator=g)
    y = (x.flatten(1).sum(1) > 0).long()
    return TensorDataset(x, y)


def train_epoch(model, optimizer, data_loader):
    criterion = nn.CrossEntropyLoss()
    for data, target in data_loader:
        optimizer.zero_grad()
        criterion(model(data), target).backward()
        optimizer.step()


def test_simple_migration(accountant_name):
    model = Net()
    optimizer = SGD(model.parameters(), lr=0.05)
    data_loader = DataLoader(make_dataset(), batch_size=16)
    privacy_engine = PrivacyEngine(accountant=accountant_name)
    model, optimizer, data_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=1.3,
        max_grad_norm=1.0,
    )
    train_epoch(model, optimizer, data_loader)
    eps = privacy_engine.get_epsilon(delta=DELTA)
    assert 0 < eps < 10
    assert privacy_engine.accountant.history  # the accountant object is there, as in Opacus


def test_model_with_batchnorm(accountant_name):
    model = ConvNet()
    assert ModuleValidator.validate(model)
    model = ModuleValidator.fix(model)
    assert isinstance(model.bn, nn.GroupNorm)
    optimizer = SGD(model.parameters(), lr=0.05)  # after fix: it replaced parameters
    privacy_engine = PrivacyEngine(accountant=accountant_name)
    model, optimizer, data_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(make_dataset(64, images=True), batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    train_epoch(model, optimizer, data_loader)
    assert privacy_engine.steps == 4


def test_virtual_steps(accountant_name):
    batch_size, max_physical_batch_size = 32, 8
    model = Net()
    optimizer = SGD(model.parameters(), lr=0.05)
    data_loader = DataLoader(make_dataset(), batch_size=batch_size)
    privacy_engine = PrivacyEngine(accountant=accountant_name)
    model, optimizer, data_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    physical = 0
    with BatchMemoryManager(
        data_loader=data_loader,
        max_physical_batch_size=max_physical_batch_size,
        optimizer=optimizer,
    ) as new_data_loader:
        for data, target in new_data_loader:
            assert len(data) <= max_physical_batch_size
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data), target).backward()
            optimizer.step()
            physical += 1
    assert privacy_engine.steps == len(data_loader) == 4  # logical batches
    assert physical > privacy_engine.steps


def test_known_privacy_budget(accountant_name):
    epochs, epsilon = 3, 2.0
    model = Net()
    optimizer = SGD(model.parameters(), lr=0.05)
    privacy_engine = PrivacyEngine(accountant=accountant_name)
    model, optimizer, data_loader = privacy_engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(make_dataset(), batch_size=16),
        epochs=epochs,
        target_epsilon=epsilon,
        target_delta=DELTA,
        max_grad_norm=1.0,
    )
    for _ in range(epochs):
        train_epoch(model, optimizer, data_loader)
    assert epsilon - 0.05 <= privacy_engine.get_epsilon(DELTA) <= epsilon


def test_no_data_loader_components_directly(accountant_name):
    """Own batches, no PrivacyEngine: a grad sampler, the DP optimizer and an accountant."""
    registry = dpcore.get_registry()
    model = Net()
    optimizer = SGD(model.parameters(), lr=0.05)
    accountant = create_accountant(accountant_name)

    grad_sampler = registry.create("grad_sampler", "hooks")
    grad_sampler.attach(model)
    batch_size, n = 16, 128
    sample_rate = batch_size / n
    dp_optimizer = dpcore.DPOptimizer(
        optimizer,
        grad_sampler=grad_sampler,
        clipper=registry.create(
            "clipper",
            "flat",
            max_grad_norm=1.0,
            parameter_names=list(grad_sampler.named_parameters()),
        ),
        noise=registry.create("noise", "gaussian"),
        noise_multiplier=1.0,
        expected_batch_size=batch_size,  # we average the loss, so the denominator is needed
        noise_generator=torch.Generator().manual_seed(0),
    )
    dp_optimizer.attach_step_hook(
        lambda opt: accountant.step(noise_multiplier=opt.noise_multiplier, sample_rate=sample_rate)
    )
    data = make_dataset(n).tensors
    g = torch.Generator().manual_seed(1)
    for _ in range(8):  # our own Poisson sampling
        idx = (torch.rand(n, generator=g) < sample_rate).nonzero().flatten()
        x, y = data[0][idx], data[1][idx]
        dp_optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        dp_optimizer.step()
    assert len(accountant) == 8 and dp_optimizer.steps == 8
    assert accountant.get_epsilon(DELTA) > 0
    grad_sampler.detach()
