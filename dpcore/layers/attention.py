"""``DPMultiheadAttention``: a drop-in replacement for ``nn.MultiheadAttention``.

Same constructor arguments, forward signature and outputs; a torch module's
``state_dict`` loads into it (``in_proj_weight`` is split into ``q_proj``,
``k_proj`` and ``v_proj``; ``bias_k``/``bias_v`` go to :class:`SequenceBias`
layers), so weights copy over. The projections are
:class:`~dpcore.layers.RNNLinear` layers and run batch-first inside, so their
per-sample gradients come from the Linear layer grad sampler.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import RNNLinear, SequenceBias


class DPMultiheadAttention(nn.Module):
    """Multi-head attention built from linear sub-layers (see module docs)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.q_proj = RNNLinear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = RNNLinear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = RNNLinear(self.vdim, embed_dim, bias=bias, **factory)
        self.seq_bias_k = SequenceBias(embed_dim, **factory) if add_bias_kv else None
        self.seq_bias_v = SequenceBias(embed_dim, **factory) if add_bias_kv else None
        self.out_proj = RNNLinear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()
        self._register_load_state_dict_pre_hook(self._accept_torch_keys)

    def _reset_parameters(self) -> None:
        # as torch: xavier on the stacked in-projection, zero biases
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            bound = math.sqrt(6.0 / (3 * self.embed_dim + proj.in_features))
            nn.init.uniform_(proj.weight, -bound, bound)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)
        for seq_bias in (self.seq_bias_k, self.seq_bias_v):
            if seq_bias is not None:
                nn.init.xavier_normal_(seq_bias.bias.view(1, 1, -1))

    def torch_parameter_names(self) -> dict[str, list[str]]:
        """``{torch name: [our names]}`` (``in_proj_weight`` is split in three)."""
        ours = dict(self.named_parameters())
        names: dict[str, list[str]] = {}
        if self.kdim == self.embed_dim and self.vdim == self.embed_dim:
            names["in_proj_weight"] = [f"{x}_proj.weight" for x in "qkv"]
        else:
            names.update({f"{x}_proj_weight": [f"{x}_proj.weight"] for x in "qkv"})
        if "q_proj.bias" in ours:
            names["in_proj_bias"] = [f"{x}_proj.bias" for x in "qkv"]
        for x in "kv":
            if f"seq_bias_{x}.bias" in ours:
                names[f"bias_{x}"] = [f"seq_bias_{x}.bias"]
        for kind in ("weight", "bias"):
            if f"out_proj.{kind}" in ours:
                names[f"out_proj.{kind}"] = [f"out_proj.{kind}"]
        return names

    def _accept_torch_keys(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Rename ``nn.MultiheadAttention`` keys to ours."""
        e = self.embed_dim
        w = state_dict.pop(prefix + "in_proj_weight", None)
        if w is not None:
            for i, name in enumerate("qkv"):
                state_dict[f"{prefix}{name}_proj.weight"] = w[i * e : (i + 1) * e]
        for name in "qkv":
            single = state_dict.pop(f"{prefix}{name}_proj_weight", None)
            if single is not None:
                state_dict[f"{prefix}{name}_proj.weight"] = single
        b = state_dict.pop(prefix + "in_proj_bias", None)
        if b is not None:
            for i, name in enumerate("qkv"):
                state_dict[f"{prefix}{name}_proj.bias"] = b[i * e : (i + 1) * e]
        for name in "kv":
            extra = state_dict.pop(f"{prefix}bias_{name}", None)
            if extra is not None:
                state_dict[f"{prefix}seq_bias_{name}.bias"] = extra.reshape(-1)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, tgt_len, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim

        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)
        extra_columns = 0
        if self.seq_bias_k is not None and self.seq_bias_v is not None:
            k, v = self.seq_bias_k(k), self.seq_bias_v(v)
            extra_columns += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, self.embed_dim)], dim=1)
            extra_columns += 1
        src_len = k.shape[1]

        def split(t: Tensor) -> Tensor:  # [B, S, E] -> [B, h, S, d]
            return t.reshape(batch, t.shape[1], heads, head_dim).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)  # [B, h, L, S]
        mask = self._additive_mask(
            attn_mask,
            key_padding_mask,
            is_causal,
            batch,
            tgt_len,
            src_len,
            extra_columns,
            scores.dtype,
            scores.device,
        )
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.dropout and self.training:
            weights = F.dropout(weights, self.dropout, training=True)
        out = (weights @ v).transpose(1, 2).reshape(batch, tgt_len, self.embed_dim)
        out = self.out_proj(out)

        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        returned = weights.mean(dim=1) if average_attn_weights else weights
        return out, (returned.squeeze(0) if unbatched else returned)

    def _additive_mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        batch: int,
        tgt_len: int,
        src_len: int,
        extra_columns: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor | None:
        """``[B or 1, h or 1, L, S]`` float mask (``-inf`` where attention is not allowed)."""

        def additive(m: Tensor) -> Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(
                    m, float("-inf")
                )
            return m.to(dtype)

        mask: Tensor | None = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(
                tgt_len, src_len - extra_columns, dtype=torch.bool, device=device
            ).triu(1)
        if attn_mask is not None:
            m = additive(attn_mask)
            m = (
                m.reshape(batch, self.num_heads, tgt_len, -1)
                if m.dim() == 3
                else m.reshape(1, 1, tgt_len, -1)
            )
            mask = F.pad(m, (0, src_len - m.shape[-1]))  # bias_k / zero-attention columns allowed
        if key_padding_mask is not None:
            k = additive(key_padding_mask).reshape(batch, 1, 1, -1)
            k = F.pad(k, (0, src_len - k.shape[-1]))
            mask = k if mask is None else mask + k
        return mask
