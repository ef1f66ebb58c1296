"""The distribution registers through the ``dpcore`` entry points only."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points, version

import dpcore


def test_entry_point_and_registry() -> None:
    eps = [ep for ep in entry_points(group="dpcore") if ep.value.startswith("dpcore_transformers")]
    assert [ep.value for ep in eps] == ["dpcore_transformers.plugin"]
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    registry = dpcore.get_registry()
    assert type(registry.layer_grad_sampler_for(Conv1D(4, 3))).__name__ == "Conv1DGradSampler"
    assert registry.layer_grad_sampler_for(LlamaRMSNorm(4)) is not None


def test_list_plugins_shows_provider_and_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dpcore", "list-plugins", "--kind", "layer_grad_sampler", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [r for r in json.loads(out) if r["provider"] == "dpcore-transformers"]
    names = {r["name"] for r in rows}
    assert "transformers.pytorch_utils.Conv1D" in names
    assert "transformers.models.llama.modeling_llama.LlamaRMSNorm" in names
    assert {r["version"] for r in rows} == {version("dpcore-transformers")}
    assert all(r["status"] == "ok" for r in rows)


def test_core_never_imports_transformers() -> None:
    code = (
        "import sys, dpcore, dpcore.engine, dpcore.optimizer, dpcore.bookkeeping, dpcore.capture;"
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gradients_keep_the_parameter_layout() -> None:
    """Conv1D stores its weight as [in, out]: its clipped sum must arrive in that layout
    (a transposed gradient would send the whole optimizer update through its per-tensor
    loop instead of the foreach kernels)."""
    import torch
    from hf_models import FAMILIES
    from torch.utils.data import DataLoader, TensorDataset

    fam = FAMILIES["gpt2"]
    torch.manual_seed(0)
    model = fam.build()
    inputs, labels = fam.inputs(), fam.targets()
    loader = DataLoader(TensorDataset(labels), batch_size=len(labels))
    for mode in ("bk", "ghost", "hooks"):
        m = fam.build()
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        engine = dpcore.PrivacyEngine(accountant="rdp")
        m, opt, _ = engine.make_private(
            module=m, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=1.0, grad_sample_mode=mode, wrap_model=False,
        )  # fmt: skip
        fam.loss(m(**inputs), labels).backward()
        opt.step()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.stride() == p.stride(), (mode, name)
