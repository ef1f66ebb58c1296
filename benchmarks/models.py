"""The benchmark models, in plain torch (no torchvision), at GPU and CPU sizes.

* ``mlp``: 784-1024-1024-10 on flat inputs (the MNIST shape);
* ``cnn``: four blocks of 3x3 convolution + GroupNorm + ReLU + 2x2 average pooling
  on 32x32x3 images, then a linear classifier;
* ``gpt``: a pre-LayerNorm decoder (fused qkv projection, causal
  ``scaled_dot_product_attention``, GELU MLP of width 4d), token and learned
  position embeddings with the position ids broadcast over the batch
  (``arange(T)[None]``, as GPT-2 does), and an untied vocabulary head.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Sequential):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class CNN(nn.Sequential):
    def __init__(self, channels: tuple[int, ...], image: int, classes: int = 10) -> None:
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1),
                nn.GroupNorm(8, c),
                nn.ReLU(),
                nn.AvgPool2d(2),
            ]
            c_in = c
        side = image // 2 ** len(channels)
        layers += [nn.Flatten(), nn.Linear(c_in * side * side, classes)]
        super().__init__(*layers)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(
        self, vocab: int, d: int, layers: int, heads: int, seq: int, expand_positions: bool = False
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        # Opacus' ghost clipping rejects broadcast position ids; its rows expand them
        self.expand_positions = expand_positions

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        if self.expand_positions:
            pos = pos.expand(ids.shape[0], -1).contiguous()
        x = self.tok(ids) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@dataclass(frozen=True)
class Workload:
    """A model factory, its batch and its loss (mean over samples, and over tokens)."""

    name: str
    batch: int
    build: Callable[..., nn.Module]
    make_batch: Callable[[int, torch.device, torch.Generator], tuple[Tensor, Tensor]]
    sequence: bool = False

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.flatten(0, -2).float(), y.flatten())


def _images(side: int) -> Callable[[int, torch.device, torch.Generator], tuple[Tensor, Tensor]]:
    def make(b: int, device: torch.device, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(b, 3, side, side, generator=g)
        return x.to(device), torch.randint(10, (b,), generator=g).to(device)

    return make


def _flat(dim: int) -> Callable[[int, torch.device, torch.Generator], tuple[Tensor, Tensor]]:
    def make(b: int, device: torch.device, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(b, dim, generator=g)
        return x.to(device), torch.randint(10, (b,), generator=g).to(device)

    return make


def _tokens(
    vocab: int, seq: int
) -> Callable[[int, torch.device, torch.Generator], tuple[Tensor, Tensor]]:
    def make(b: int, device: torch.device, g: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(vocab, (b, seq + 1), generator=g)
        return ids[:, :-1].to(device), ids[:, 1:].to(device)

    return make


def workloads(small: bool = False) -> dict[str, Workload]:
    """The issue's sizes, or (``small``) sizes that run in seconds on a CPU."""
    if small:
        return {
            "mlp": Workload("mlp", 64, lambda: MLP((784, 128, 128, 10)), _flat(784)),
            "cnn": Workload("cnn", 16, lambda: CNN((8, 16, 32, 32), 32), _images(32)),
            "gpt": Workload(
                "gpt",
                4,
                lambda expand_positions=False: GPT(512, 64, 2, 4, 32, expand_positions),
                _tokens(512, 32),
                sequence=True,
            ),
        }
    return {
        "mlp": Workload("mlp", 1024, lambda: MLP((784, 1024, 1024, 10)), _flat(784)),
        "cnn": Workload("cnn", 256, lambda: CNN((32, 64, 128, 256), 32), _images(32)),
        "gpt": Workload(
            "gpt",
            32,
            lambda expand_positions=False: GPT(16384, 768, 6, 12, 256, expand_positions),
            _tokens(16384, 256),
            sequence=True,
        ),
    }
