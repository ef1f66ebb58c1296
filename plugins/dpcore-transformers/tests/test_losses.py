"""Token-level losses: padded causal-LM losses clip exactly per sample in every mode,
also when the model computes the loss itself from ``labels``."""

from __future__ import annotations

import pytest
import torch
from dpcore_transformers import causal_lm_loss, use_per_sample_loss
from hf_models import FAMILIES, token_batch

from dpcore.verify import check_per_sample_gradients

LM_FAMILIES = ["gpt2", "llama"]


def test_causal_lm_loss_is_the_mean_of_per_sample_token_means() -> None:
    torch.manual_seed(0)
    ids, mask, labels = token_batch()
    logits = torch.randn(*ids.shape, 11)
    labels = labels.clamp(max=10).masked_fill(mask == 0, -100)
    per_sample = [causal_lm_loss(logits[i : i + 1], labels[i : i + 1]) for i in range(3)]
    assert torch.allclose(causal_lm_loss(logits, labels), torch.stack(per_sample).mean())
    assert torch.allclose(
        causal_lm_loss(logits, labels, reduction="sum"), torch.stack(per_sample).sum()
    )
    # padding tokens do not count: changing their logits changes nothing
    logits2 = logits.clone()
    logits2[0, -3:] += 5.0  # positions predicting padded labels (and the last, unused one)
    assert torch.allclose(causal_lm_loss(logits2, labels), causal_lm_loss(logits, labels))


def test_a_sample_without_tokens_contributes_zero() -> None:
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 4], [-100, -100, -100, -100]])
    causal_lm_loss(logits, labels, reduction="sum").backward()
    assert logits.grad[1].abs().sum() == 0


@pytest.mark.parametrize("name", LM_FAMILIES)
@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_loss_computed_inside_the_model_from_labels(name: str, mode: str) -> None:
    """HF's own loss averages over the batch's tokens (a sample's weight depends on the
    other samples); use_per_sample_loss makes it the mean of per-sample means, which the
    micro-batch oracle (the model's own loss on each sample alone) confirms."""
    model = use_per_sample_loss(FAMILIES[name].build())
    ids, mask, labels = token_batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    report = check_per_sample_gradients(
        model, inputs, torch.zeros(3), lambda out, _: out.loss, grad_sample_mode=mode
    )
    assert report.ok, report.summary()


def test_hf_default_loss_is_not_per_sample() -> None:
    """Why use_per_sample_loss exists: with HF's batch-wide token mean a sample's gradient
    depends on the other samples' token counts, so micro-batches disagree."""
    model = FAMILIES["gpt2"].build()
    ids, mask, labels = token_batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    report = check_per_sample_gradients(
        model, inputs, torch.zeros(3), lambda out, _: out.loss, grad_sample_mode="bk"
    )
    assert report.mismatches


def test_ghost_refuses_a_loss_inside_the_model_naming_bk() -> None:
    model = use_per_sample_loss(FAMILIES["gpt2"].build())
    ids, mask, labels = token_batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    report = check_per_sample_gradients(
        model, inputs, torch.zeros(3), lambda out, _: out.loss, grad_sample_mode="ghost"
    )
    assert report.error is not None and "'bk'" in report.error
    assert not report.mismatches


def test_padding_changes_nothing_for_the_padded_positions() -> None:
    """Per-sample gradients with padding equal those of the unpadded sample alone."""
    import dpcore

    model = FAMILIES["gpt2"].build()
    ids, mask, labels = token_batch()
    gs = dpcore.get_registry().create("grad_sampler", "bk", {})
    gs.attach(model, loss_reduction="sum")
    causal_lm_loss(
        model(input_ids=ids, attention_mask=mask).logits, labels, reduction="sum"
    ).backward()
    norms = gs.per_sample_sq_norms()
    gs.clipped_sums({n: torch.ones(3) for n in norms})
    gs.detach()
    # sample 0 has 5 real tokens then padding: run it alone, unpadded
    model.zero_grad()
    causal_lm_loss(model(input_ids=ids[:1, :5]).logits, labels[:1, :5], reduction="sum").backward()
    for n, p in model.named_parameters():
        want = p.grad.pow(2).sum() if p.grad is not None else torch.tensor(0.0)
        assert torch.allclose(norms[n][0], want, rtol=1e-3, atol=1e-7), n


@pytest.mark.parametrize("name", LM_FAMILIES)
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_padded_token_loss_under_bf16_autocast(name: str, mode: str) -> None:
    ids, mask, labels = token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = check_per_sample_gradients(
            FAMILIES[name].build(), {"input_ids": ids, "attention_mask": mask}, labels,
            lambda out, y: causal_lm_loss(out.logits, y), grad_sample_mode=mode,
            atol=2e-2, rtol=5e-2,
        )  # fmt: skip
    assert report.ok, report.summary()
