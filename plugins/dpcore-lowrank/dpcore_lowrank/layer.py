"""``LowRankLinear``: ``y = x Wᵀ + b + scale · (x Aᵀ) Bᵀ``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LowRankLinear(nn.Module):
    """A linear layer plus a trainable rank-``rank`` update (LoRA).

    ``weight``/``bias`` are the base layer (frozen unless ``train_base=True``);
    ``lora_a: [rank, in]`` and ``lora_b: [out, rank]`` are the update, scaled by
    ``alpha / rank``. ``lora_b`` starts at zero, so a fresh layer equals its base.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 4,
        alpha: float | None = None,
        bias: bool = True,
        train_base: bool = False,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("rank must be at least 1")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=train_base)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(
            F.linear(x, self.lora_a), self.lora_b
        )

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scale={self.scale:g}"
