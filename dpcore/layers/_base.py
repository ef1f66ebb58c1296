"""Building blocks of the DP layers: sub-layers whose per-sample gradients the
built-in layer grad samplers know."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RNNLinear(nn.Linear):
    """A linear layer used inside the DP layers.

    Its input always has the batch dimension first (``[B, ...]``), whatever the
    ``batch_first`` of the model: grad samplers read ``_dpcore_batch_first``. It may be
    called once per time step; the per-sample gradients of the calls add up.
    """

    _dpcore_batch_first = True


class SequenceBias(nn.Module):
    """Appends a learned vector to a batch-first sequence: ``[B, S, E] -> [B, S+1, E]``
    (the ``bias_k``/``bias_v`` of attention with ``add_bias_kv=True``)."""

    _dpcore_batch_first = True

    def __init__(self, embed_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(embed_dim, device=device, dtype=dtype))
        nn.init.normal_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.bias.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
