"""ViT's own embedding parameters: exact from output-gradient slices, refused where the
output gradient cannot tell (dropout after the additions, unrecorded mask)."""

from __future__ import annotations

import pytest
import torch
from hf_models import FAMILIES, B

import dpcore
from dpcore.errors import GradSampleError
from dpcore.verify import check_per_sample_gradients


def test_registered_sampler_serves_vit_embeddings() -> None:
    model = FAMILIES["vit"].build()
    sampler = dpcore.get_registry().layer_grad_sampler_for(model.vit.embeddings)
    assert type(sampler).__name__ == "ViTEmbeddingsGradSampler"


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_dropout_after_the_embeddings_is_refused(mode: str) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        image_size=16, patch_size=4, num_labels=3, hidden_dropout_prob=0.1,
    )  # fmt: skip
    model = ViTForImageClassification(cfg).train()
    gs = dpcore.get_registry().create(
        "grad_sampler", mode, {"check_sums": False} if mode == "hooks" else {}
    )
    gs.attach(model)
    with pytest.raises(GradSampleError, match="hidden_dropout_prob"):  # bk: in backward
        model(pixel_values=torch.randn(B, 3, 16, 16)).logits.sum().backward()
        gs.per_sample_sq_norms()
    gs.detach()


def _masked_vit():  # type: ignore[no-untyped-def]
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        image_size=16, patch_size=4,
    )  # fmt: skip
    model = ViTModel(cfg, add_pooling_layer=False, use_mask_token=True)
    g = torch.Generator().manual_seed(2)
    inputs = {
        "pixel_values": torch.randn(B, 3, 16, 16, generator=g),
        "bool_masked_pos": torch.rand(B, 16, generator=g) < 0.5,
    }
    return model, inputs


def _loss(out, _):  # type: ignore[no-untyped-def]
    return out.last_hidden_state.pow(2).mean()


def test_mask_token_is_exact_in_hooks() -> None:
    model, inputs = _masked_vit()
    report = check_per_sample_gradients(model, inputs, torch.zeros(B), _loss, "hooks")
    assert report.ok, report.summary()
    assert "embeddings.mask_token" in report.parameters


def test_mask_token_in_bk_is_refused_naming_hooks() -> None:
    model, inputs = _masked_vit()
    report = check_per_sample_gradients(model, inputs, torch.zeros(B), _loss, "bk")
    assert report.error is not None and "'hooks'" in report.error
    assert not report.mismatches
