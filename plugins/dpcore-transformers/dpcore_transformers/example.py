"""The GPT-2 + LoRA example: factories for ``dpcore train`` (``examples/gpt2-lora.toml``).

A character-level GPT-2 (2 layers, width 64, built from a config) is first
pretrained *non-privately* on ``data/public.txt`` (everyday stories), then LoRA
adapters (rank 8 on attention and MLP) are fine-tuned *privately* on
``data/private.txt`` (weather station reports, a disjoint corpus of another
domain). The validation split is held-out reports; ``dpcore train`` prints its loss
(the mean over reports of each report's mean token loss; perplexity = exp(loss)).

Everything is seeded and built locally (no downloads); pretraining takes about a
few seconds of CPU per 100 steps.
"""

from __future__ import annotations

import math
from functools import lru_cache
from importlib.resources import files

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .losses import causal_lm_loss

PAD = 0
SEQ_LEN = 80  # the longest line is shorter; lines are right-padded


@lru_cache(maxsize=1)
def vocabulary() -> str:
    text = _read("public.txt") + _read("private.txt")
    return "".join(sorted(set(text) - {"\n"}))


def _read(name: str) -> str:
    return files("dpcore_transformers.data").joinpath(name).read_text()


def encode(line: str) -> tuple[Tensor, Tensor]:
    """``(ids, labels)`` of one line: ``[SEQ_LEN]`` each, padding labelled -100."""
    index = {c: i + 1 for i, c in enumerate(vocabulary())}
    ids = [index[c] for c in line[: SEQ_LEN - 1]] + [PAD]  # a final pad acts as end-of-line
    n = len(ids)
    ids = ids + [PAD] * (SEQ_LEN - n)
    labels = ids[:n] + [-100] * (SEQ_LEN - n)
    return torch.tensor(ids), torch.tensor(labels)


class Lines(Dataset):
    """One line per sample: ``(ids, labels)``."""

    def __init__(self, lines: list[str]) -> None:
        pairs = [encode(line) for line in lines]
        self.ids = torch.stack([p[0] for p in pairs])
        self.labels = torch.stack([p[1] for p in pairs])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.ids[i], self.labels[i]


def _lines(name: str) -> list[str]:
    return [line for line in _read(name).splitlines() if line]


def weather_reports(validation: int = 150) -> tuple[Lines, Lines]:
    """The private data: ``(train, validation)`` splits of the station reports."""
    lines = _lines("private.txt")
    return Lines(lines[validation:]), Lines(lines[:validation])


def public_stories() -> Lines:
    return Lines(_lines("public.txt"))


class LMLogits(nn.Module):
    """``ids -> logits`` around a Hugging Face causal LM (``dpcore train`` calls
    ``model(inputs)``); the attention mask is derived from the padding."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids, attention_mask=(ids != PAD).long()).logits


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(vocabulary()) + 1,
        n_positions=SEQ_LEN,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=PAD,
        eos_token_id=PAD,
        pad_token_id=PAD,
    )
    return GPT2LMHeadModel(config)


def pretrain(model: nn.Module, steps: int, seed: int = 0, batch_size: int = 32) -> nn.Module:
    """Ordinary (non-private) training on the public stories."""
    data = public_stories()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        ids, labels = data.ids[idx], data.labels[idx]
        logits = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits
        loss = causal_lm_loss(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def gpt2_lora(pretrain_steps: int = 300, rank: int = 8, seed: int = 0) -> nn.Module:
    """The model of the example: a pretrained tiny GPT-2 with LoRA adapters, only the
    adapters trainable (needs ``peft``: ``pip install "dpcore-transformers[peft]"``)."""
    import peft

    model = pretrain(tiny_gpt2(seed), pretrain_steps, seed)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["c_attn", "c_proj", "c_fc"],
        lora_dropout=0.0,
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight transposed
    )
    return LMLogits(peft.get_peft_model(model, config))


@torch.no_grad()
def perplexity(model: nn.Module, data: Lines, batch_size: int = 256) -> float:
    """exp of the mean over samples of each sample's mean token loss (the metric of
    ``dpcore train``'s test loss)."""
    model.eval()
    total = 0.0
    for i in range(0, len(data), batch_size):
        ids, labels = data.ids[i : i + batch_size], data.labels[i : i + batch_size]
        total += float(causal_lm_loss(model(ids), labels, reduction="sum"))
    return math.exp(total / len(data))


__all__ = ["LMLogits", "gpt2_lora", "perplexity", "pretrain", "tiny_gpt2", "weather_reports"]
