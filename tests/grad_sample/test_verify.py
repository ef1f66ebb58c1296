"""The public checker, and ``dpcore check`` on models defined in user files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

import dpcore
from dpcore.cli import app
from dpcore.errors import GradSampleError
from dpcore.layer_sampling import MaterializingLayerGradSampler
from dpcore.registry import PluginInfo
from dpcore.verify import CheckReport, check_per_sample_gradients

MODES = ["hooks", "functorch", "ew"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def data(batch: int = 5) -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    return torch.randn(batch, 4), torch.randint(0, 3, (batch,))


@pytest.mark.parametrize("mode", MODES)
def test_correct_model_passes(mode: str) -> None:
    x, y = data()
    report = check_per_sample_gradients(mlp(), x, y, nn.CrossEntropyLoss(), mode)
    assert report.ok and bool(report)
    assert report.parameters == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert report.max_abs_error < 1e-5
    report.raise_for_failure()


def test_module_is_not_modified() -> None:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_per_sample_gradients(model, *data(), nn.CrossEntropyLoss(), "ew")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert "forward" not in vars(model) and not model._forward_hooks


class WrongSampler(MaterializingLayerGradSampler):
    """A planted bug: the bias gradient of sample 0 is doubled."""

    def per_sample_grads(self, layer, inputs, grad_output):
        a, g = inputs[0], grad_output
        bias = g.clone()
        bias[0] *= 2
        return {"weight": torch.einsum("bp,bd->bpd", g, a), "bias": bias}


class Odd(nn.Linear):
    pass


def test_wrong_layer_sampler_is_named_by_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    info = PluginInfo(
        "layer_grad_sampler",
        "Odd",
        "tests",
        "",
        "tests",
        "tests",
        obj=WrongSampler(),
        module_type=Odd,
    )
    registry = dpcore.get_registry()
    monkeypatch.setitem(registry._entries, ("layer_grad_sampler", "Odd"), info)
    monkeypatch.setitem(registry._layer_types, Odd, info)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    model.add_module("head", Odd(6, 3))
    report = check_per_sample_gradients(model, *data(), nn.CrossEntropyLoss(), "hooks")
    assert not report.ok
    assert report.mismatched_parameters == ["head.bias"]
    assert {m.module for m in report.mismatches} == {"head"}
    assert all(m.max_abs_error > 0 for m in report.mismatches)
    assert "head.bias (module head)" in report.summary()
    with pytest.raises(GradSampleError, match=r"head\.bias"):
        report.raise_for_failure()


class BatchStatistics(nn.Module):
    """Planted mixing: normalises with the batch mean (what BatchNorm does)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x - x.mean(0, keepdim=True) + 0.5)


class TransposeMixing(nn.Module):
    """Planted mixing: a transpose puts the batch on the softmax axis."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, 4]
        h = self.lin(x).transpose(0, 1)  # [T, B, 3]
        return torch.softmax(h, dim=1).transpose(0, 1).mean(1)


class TransposeTime(nn.Module):
    """Planted misuse: treats dim 0 as time, so layers see the batch on dim 1. The outputs
    do not mix samples, but a layer sampler reading dim 0 as the batch is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.transpose(0, 1)).transpose(0, 1).mean(1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_cls", [BatchStatistics, TransposeMixing])
def test_batch_mixing_is_detected(mode: str, model_cls: type) -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 4) if model_cls is BatchStatistics else torch.randn(4, 4, 4)
    report = check_per_sample_gradients(
        model_cls(), x, torch.randint(0, 3, (4,)), nn.CrossEntropyLoss(), mode
    )
    assert report.batch_mixing and not report.ok
    assert "mixes samples" in report.mixing_details


def test_batchnorm_is_reported_as_mixing() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    report = check_per_sample_gradients(model, *data(), nn.CrossEntropyLoss(), "hooks")
    assert report.batch_mixing and "BatchNorm" in report.mixing_details


def test_transposed_batch_dimension_is_caught() -> None:
    torch.manual_seed(3)
    y = torch.randint(0, 3, (5,))
    # T == B: the layer cannot tell, the per-sample gradients are wrong, the check says so
    report = check_per_sample_gradients(
        TransposeTime(), torch.randn(5, 5, 4), y, nn.CrossEntropyLoss(), "hooks"
    )
    assert not report.ok and not report.batch_mixing
    assert report.mismatched_parameters == ["lin.bias", "lin.weight"]
    assert any("batch dimension" in h for h in report.hints)
    # T != B: refused up front with a clear error
    report = check_per_sample_gradients(
        TransposeTime(), torch.randn(5, 6, 4), y, nn.CrossEntropyLoss(), "hooks"
    )
    assert report.error is not None and "'lin'" in report.error
    # functorch recomputes whole samples and gets it right
    assert check_per_sample_gradients(
        TransposeTime(), torch.randn(5, 5, 4), y, nn.CrossEntropyLoss(), "functorch"
    ).ok


def test_wrong_loss_reduction_gets_a_hint() -> None:
    report = check_per_sample_gradients(
        mlp(), *data(), nn.CrossEntropyLoss(reduction="sum"), "hooks", loss_reduction="mean"
    )
    assert not report.ok
    assert any("loss_reduction='sum'" in h for h in report.hints)
    report = check_per_sample_gradients(
        mlp(), *data(), nn.CrossEntropyLoss(), "hooks", loss_reduction="sum"
    )
    assert any("loss_reduction='mean'" in h for h in report.hints)
    assert check_per_sample_gradients(
        mlp(), *data(), nn.CrossEntropyLoss(reduction="sum"), "hooks", loss_reduction="sum"
    ).ok


def test_dict_and_tuple_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, left: Tensor, right: Tensor) -> Tensor:
            return self.a(left) * self.b(right)

    left, right, y = torch.randn(3, 3), torch.randn(3, 4), torch.randn(3, 2)
    loss = nn.MSELoss()
    assert check_per_sample_gradients(TwoInputs(), (left, right), y, loss, "hooks").ok
    assert check_per_sample_gradients(
        TwoInputs(), {"left": left, "right": right}, y, loss, "functorch"
    ).ok


def test_unsupported_mode_is_an_error_not_a_mismatch() -> None:
    report = check_per_sample_gradients(
        nn.Sequential(nn.Linear(4, 3), nn.RMSNorm(3)), *data(), nn.CrossEntropyLoss(), "ew"
    )
    assert report.error is not None and not report.mismatches and not report.ok
    assert isinstance(report, CheckReport)


# -- the command line ------------------------------------------------------------------------------
USER_FILE = """
import torch
from torch import nn

from helper_layers import Block  # a neighbour of this file


def good():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(6, 3))
    return model, torch.randn(4, 5), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss()


def as_dict():
    model, x, y, loss = good()
    return {"model": model, "inputs": x, "targets": y, "loss_fn": loss, "loss_reduction": "mean"}


def mixing():
    model = nn.Sequential(Block(), nn.BatchNorm1d(6), nn.Linear(6, 3))
    return model, torch.randn(4, 5), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss()


def wrong_reduction():
    model, x, y, _ = good()
    return model, x, y, nn.CrossEntropyLoss(reduction="sum")


def broken():
    return 42
"""


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "user_models.py").write_text(textwrap.dedent(USER_FILE))
    (tmp_path / "helper_layers.py").write_text(
        "from torch import nn\n\n\nclass Block(nn.Sequential):\n"
        "    def __init__(self):\n        super().__init__(nn.Linear(5, 6), nn.Tanh())\n"
    )
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(app, ["check", *args])


def test_cli_checks_a_user_file_with_every_grad_sampler(user_dir: Path) -> None:
    result = run(f"{user_dir / 'user_models.py'}:good")
    assert result.exit_code == 0, result.output
    for mode in dpcore.get_registry().names("grad_sampler"):
        assert mode in result.output
    assert "OK" in result.output


def test_cli_dict_factory_and_one_mode(user_dir: Path) -> None:
    result = run(f"{user_dir / 'user_models.py'}:as_dict", "--grad-sample-mode", "functorch")
    assert result.exit_code == 0, result.output
    assert "functorch" in result.output and "hooks" not in result.output


def test_cli_module_path(user_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(user_dir))
    result = run("user_models:good", "-m", "hooks")
    assert result.exit_code == 0, result.output


def test_cli_exit_code_1_on_mixing_and_mismatch(user_dir: Path) -> None:
    result = run(f"{user_dir / 'user_models.py'}:mixing", "-m", "hooks")
    assert result.exit_code == 1 and "MIXES SAMPLES" in result.output
    result = run(f"{user_dir / 'user_models.py'}:wrong_reduction", "-m", "hooks", "-v")
    assert result.exit_code == 1 and "MISMATCH" in result.output
    assert "loss_reduction='sum'" in result.output


def test_cli_usage_errors(user_dir: Path) -> None:
    assert run("no_colon_here").exit_code == 2
    assert run(f"{user_dir / 'missing.py'}:good").exit_code == 2
    assert run(f"{user_dir / 'user_models.py'}:nope").exit_code == 2
    result = run(f"{user_dir / 'user_models.py'}:broken")
    assert result.exit_code == 2 and "(model, inputs, targets, loss_fn)" in result.output
    result = run(f"{user_dir / 'user_models.py'}:good", "-m", "hoks")
    assert result.exit_code == 2 and "hooks" in result.output  # did you mean


def test_parameter_used_outside_its_layer_is_a_mismatch_for_hooks_only() -> None:
    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return torch.nn.functional.linear(self.lin(x), self.lin.weight)

    x, y = torch.randn(4, 3), torch.randn(4, 3)
    report = check_per_sample_gradients(Direct(), x, y, nn.MSELoss(), "hooks")
    assert report.mismatched_parameters == ["lin.weight"]
    assert check_per_sample_gradients(Direct(), x, y, nn.MSELoss(), "functorch").ok


def test_cli_json(user_dir: Path) -> None:
    import json

    result = run(f"{user_dir / 'user_models.py'}:good", "-m", "hooks", "-m", "functorch", "--json")
    assert result.exit_code == 0, result.output
    reports = json.loads(result.output)
    assert [r["grad_sample_mode"] for r in reports] == ["hooks", "functorch"]
    assert all(r["ok"] and r["parameters"] for r in reports)
    result = run(f"{user_dir / 'user_models.py'}:wrong_reduction", "-m", "hooks", "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)[0]["mismatches"][0]["name"] == "0.0.weight"
