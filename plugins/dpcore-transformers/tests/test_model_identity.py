"""What make_private returns can be used as the Hugging Face model."""

from __future__ import annotations

import torch
from hf_models import FAMILIES, token_batch
from torch.utils.data import DataLoader, TensorDataset

import dpcore


def _private(model: torch.nn.Module, **kwargs):  # type: ignore[no-untyped-def]
    ids, mask, labels = token_batch()
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpcore.PrivacyEngine(accountant="rdp")
    out = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, grad_sample_mode="bk", seed=0, **kwargs,
    )  # fmt: skip
    return engine, *out


def test_wrapped_model_behaves_like_the_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import GPT2LMHeadModel

    model = FAMILIES["gpt2"].build()
    keys = list(model.state_dict())
    engine, private, opt, loader = _private(model)
    assert isinstance(private, GPT2LMHeadModel)
    assert private.config is model.config and private.config.n_layer == 2
    assert private.transformer is model.transformer
    assert list(private.state_dict()) == keys
    assert [n for n, _ in private.named_parameters()] == [n for n, _ in model.named_parameters()]
    private.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)
    private.eval()
    with torch.no_grad():
        generated = private.generate(torch.tensor([[5, 6]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 5)
    # and it trains
    private.train()
    for ids, mask, labels in loader:
        from dpcore_transformers import causal_lm_loss

        causal_lm_loss(private(input_ids=ids, attention_mask=mask).logits, labels).backward()
        opt.step()
        opt.zero_grad()
    assert engine.steps == 1


def test_wrap_model_false_returns_the_same_object_and_detach_removes_hooks() -> None:
    model = FAMILIES["gpt2"].build()
    engine, private, _opt, _loader = _private(model, wrap_model=False)
    assert private is model
    conv = model.transformer.h[0].attn.c_attn
    assert "forward" in conv.__dict__  # bk's tap
    assert model._forward_pre_hooks
    engine.detach()
    assert "forward" not in conv.__dict__
    assert not model._forward_pre_hooks
    ids, _mask, _labels = token_batch()
    model(input_ids=ids).logits.sum().backward()  # a plain model again: autograd grads
    assert conv.weight.grad is not None
