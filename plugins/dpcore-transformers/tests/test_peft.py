"""PEFT / LoRA: only adapters cost per-sample work; a parameter created, replaced or
unfrozen after make_private is refused by name, never silently left alone."""

from __future__ import annotations

import pytest
import torch
from dpcore_transformers import causal_lm_loss
from hf_models import FAMILIES, token_batch
from torch.utils.data import DataLoader, TensorDataset

import dpcore
from dpcore.errors import PrivacyEngineError

peft = pytest.importorskip("peft")

CLIP = 0.05  # small enough that every sample is clipped


def lora_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0,
        fan_in_fan_out=True, init_lora_weights=False,  # non-zero B: every adapter gets gradient
    )  # fmt: skip
    return peft.get_peft_model(FAMILIES["gpt2"].build(), config)


def _make_private(model: torch.nn.Module, mode: str):  # type: ignore[no-untyped-def]
    ids, mask, labels = token_batch()
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine = dpcore.PrivacyEngine(accountant="rdp")
    private, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=CLIP, grad_sample_mode=mode, seed=0, wrap_model=False,
    )  # fmt: skip
    return engine, private, opt, (ids, mask, labels)


def _oracle_update(model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Σ_i clip(g_i) / B from micro-batches of size one (noise 0, SGD lr 1)."""
    ids, mask, labels = batch
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(ids.shape[0]):
        grads = torch.autograd.grad(
            causal_lm_loss(model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits,
                           labels[i : i + 1]),
            list(params.values()),
        )  # fmt: skip
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, CLIP / (float(norm) + 1e-6))
        for n, g in zip(params, grads, strict=True):
            total[n] += g * factor
    return {n: -t / ids.shape[0] for n, t in total.items()}


def _step(model: torch.nn.Module, opt, batch) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    ids, mask, labels = batch
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
    opt.step()
    opt.zero_grad()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_lora_step_is_the_clipped_micro_batch_update(mode: str) -> None:
    model = lora_gpt2()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    want = _oracle_update(model, token_batch())
    _engine, private, opt, batch = _make_private(model, mode)
    got = _step(private, opt, batch)
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4), n
    assert all(float(want[n].abs().sum()) > 0 for n in want)


def test_bk_keeps_nothing_for_frozen_layers() -> None:
    model = lora_gpt2()
    _engine, private, opt, (ids, mask, labels) = _make_private(model, "bk")
    gs = opt.grad_sampler
    assert gs.units and all("lora_" in u.path for u in gs.units)
    frozen_conv = model.base_model.model.transformer.h[0].attn.c_attn.base_layer
    assert "forward" not in frozen_conv.__dict__ and not frozen_conv._forward_hooks
    causal_lm_loss(private(input_ids=ids, attention_mask=mask).logits, labels).backward()
    recorded = {u.path for u in gs.units if u.calls or any("lora_" in q for q in gs._materialised)}
    assert recorded and all("lora_" in p for p in recorded)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_adapter_replaced_after_make_private_is_refused_by_name(mode: str) -> None:
    model = lora_gpt2()
    _engine, private, opt, (ids, mask, labels) = _make_private(model, mode)
    layer = model.base_model.model.transformer.h[1].mlp.c_fc.lora_A["default"]
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))  # planted: a lazy adapter
    causal_lm_loss(private(input_ids=ids, attention_mask=mask).logits, labels).backward()
    with pytest.raises(PrivacyEngineError, match=r"h\.1\.mlp\.c_fc\.lora_A\.default\.weight"):
        opt.step()


def test_parameter_unfrozen_after_make_private_is_refused_by_name() -> None:
    model = lora_gpt2()
    _engine, private, opt, (ids, mask, labels) = _make_private(model, "bk")
    model.base_model.model.transformer.ln_f.weight.requires_grad_(True)
    causal_lm_loss(private(input_ids=ids, attention_mask=mask).logits, labels).backward()
    with pytest.raises(PrivacyEngineError, match=r"transformer\.ln_f\.weight"):
        opt.step()


@pytest.mark.parametrize("when", ["before", "after"])
def test_moved_before_or_after_make_private(when: str) -> None:
    """``.to()`` keeps parameter identity, so coverage survives a move either side."""
    import copy

    model = lora_gpt2()
    target = torch.float64
    want = _oracle_update(copy.deepcopy(model).to(target), token_batch())
    if when == "before":
        model.to(target)
    _engine, private, opt, batch = _make_private(model, "bk")
    if when == "after":
        private.to(target)
    got = _step(private, opt, batch)
    for n in want:
        assert got[n].dtype == target
        assert torch.allclose(got[n], want[n], atol=1e-9, rtol=1e-6), n


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_lora_step_under_bf16_autocast(mode: str) -> None:
    """Under autocast the clipped update stays the micro-batch oracle's (bf16 tolerance)."""
    model = lora_gpt2()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _oracle_update(model, token_batch())
        _, private, opt, batch = _make_private(model, mode)
        got = _step(private, opt, batch)
    for n in want:
        scale = float(want[n].abs().max())
        assert float((got[n] - want[n]).abs().max()) <= 0.05 * scale + 1e-6, n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("when", ["before", "after"])
def test_moved_to_cuda_before_or_after_make_private(when: str) -> None:
    model = lora_gpt2()
    if when == "before":
        model.cuda()
    _, private, opt, (ids, mask, labels) = _make_private(model, "bk")
    if when == "after":
        private.cuda()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    logits = private(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
    causal_lm_loss(logits, labels.cuda()).backward()
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.is_cuda and not torch.equal(p, before[n]), n


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_full_gpt2_step_is_the_clipped_micro_batch_update(mode: str) -> None:
    """Full fine-tuning (tied embeddings, Conv1D, broadcast positions), through the engine."""
    model = FAMILIES["gpt2"].build()
    want = _oracle_update(model, token_batch())
    _, private, opt, batch = _make_private(model, mode)
    got = _step(private, opt, batch)
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4), n
