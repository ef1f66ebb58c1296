"""Tiny Hugging Face models built from configs (no downloads) and their batches.

Dropout is off: the micro-batch oracle cannot replay a random mask (attention
dropout inside ``scaled_dot_product_attention`` is not an ``nn.Dropout`` the check
could switch off). Models stay in training mode."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")

from dpcore_transformers import causal_lm_loss  # noqa: E402

VOCAB, T, B = 100, 8, 3


@dataclass
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Tensor]]
    targets: Callable[[], Tensor]
    loss: Callable[[Any, Tensor], Tensor]


def token_batch(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """ids, attention mask (sample 0 padded at the end, sample 1 at the start), labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -3:] = 0
    mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def lm_loss(out: Any, labels: Tensor) -> Tensor:
    return causal_lm_loss(out.logits, labels)


def cls_loss(out: Any, y: Tensor) -> Tensor:
    return F.cross_entropy(out.logits.float(), y)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)  # tied input/output embeddings by default


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=16,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        vocab_size=VOCAB, max_position_embeddings=16, num_labels=3, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(cfg)


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        image_size=16, patch_size=4, num_labels=3,
    )  # fmt: skip
    return ViTForImageClassification(cfg)


def _text_inputs() -> dict[str, Tensor]:
    ids, mask, _ = token_batch()
    return {"input_ids": ids, "attention_mask": mask}


FAMILIES = {
    "gpt2": Family("gpt2", gpt2, _text_inputs, lambda: token_batch()[2], lm_loss),
    "llama": Family("llama", llama, _text_inputs, lambda: token_batch()[2], lm_loss),
    "bert": Family("bert", bert, _text_inputs, lambda: torch.tensor([0, 1, 2]), cls_loss),
    "vit": Family(
        "vit",
        vit,
        lambda: {
            "pixel_values": torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        },
        lambda: torch.tensor([0, 1, 2]),
        cls_loss,
    ),
}
