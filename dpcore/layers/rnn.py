"""``DPRNN``, ``DPGRU``, ``DPLSTM``: drop-in replacements for ``nn.RNN/GRU/LSTM``.

Same constructor arguments, forward signature (padded tensors or
``PackedSequence``, optional initial state, unbatched input), outputs and
initialisation as the torch modules, and a ``state_dict`` of a torch module loads
into them (``weight_ih_l0`` -> ``cells.0.ih.weight`` ...), so weights copy over.

The recurrence is written with :class:`~dpcore.layers.RNNLinear` sub-layers, so
per-sample gradients come from the Linear layer grad sampler: the input
projection of a whole sequence is one call; the hidden projection is one call per
time step and the calls' per-sample gradients add up. Everything inside runs
batch-first, whatever ``batch_first`` says about the input.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ._base import RNNLinear

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
_TORCH_KEY = re.compile(r"^(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")


class _Cell(nn.Module):
    """The parameters of one layer in one direction."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        gates: int,
        bias: bool,
        proj_size: int,
        **factory: Any,
    ) -> None:
        super().__init__()
        out = proj_size or hidden_size
        self.ih = RNNLinear(input_size, gates * hidden_size, bias=bias, **factory)
        self.hh = RNNLinear(out, gates * hidden_size, bias=bias, **factory)
        self.hr = RNNLinear(hidden_size, proj_size, bias=False, **factory) if proj_size else None


def _reverse(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence of ``[B, T, ...]`` within its own length (padding stays put)."""
    if lengths is None:
        return x.flip(1)
    steps = torch.arange(x.shape[1], device=x.device)
    lengths = lengths.to(x.device)[:, None]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # [B, T]
    index = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class DPRNNBase(nn.Module):
    """Shared implementation; use :class:`DPRNN`, :class:`DPGRU` or :class:`DPLSTM`."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if proj_size and mode != "LSTM":
            raise ValueError("proj_size is only supported by LSTM")
        if proj_size < 0 or (proj_size and proj_size >= hidden_size):
            raise ValueError("proj_size has to be a positive integer smaller than hidden_size")
        if not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1]")
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        self.num_directions = 2 if bidirectional else 1
        out = proj_size or hidden_size
        self.cells = nn.ModuleList(
            _Cell(
                input_size if layer == 0 else out * self.num_directions,
                hidden_size,
                _GATES[mode],
                bias,
                proj_size,
                device=device,
                dtype=dtype,
            )
            for layer in range(num_layers)
            for _ in range(self.num_directions)
        )
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._accept_torch_keys)

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def torch_parameter_names(self) -> dict[str, list[str]]:
        """``{torch name: [our names]}``, e.g. ``weight_ih_l0_reverse -> [cells.1.ih.weight]``
        (to carry ``requires_grad`` or optimizer state over from a torch module)."""
        names: dict[str, list[str]] = {}
        for own, _ in self.named_parameters():
            _, index, part, kind = own.split(".")
            layer, direction = divmod(int(index), self.num_directions)
            suffix = "_reverse" if direction else ""
            names[f"{kind}_{part}_l{layer}{suffix}"] = [own]
        return names

    def _accept_torch_keys(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Rename ``nn.RNN/GRU/LSTM`` keys (``weight_ih_l0_reverse``) to ours."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            match = _TORCH_KEY.match(key[len(prefix) :])
            if match:
                kind, part, layer, reverse = match.groups()
                cell = int(layer) * self.num_directions + (1 if reverse else 0)
                state_dict[f"{prefix}cells.{cell}.{part}.{kind}"] = state_dict.pop(key)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, input: Any, hx: Any = None) -> tuple[Any, Any]:
        packed = isinstance(input, PackedSequence)
        lengths: Tensor | None = None
        if packed:
            x, lengths = pad_packed_sequence(input, batch_first=True)
            unbatched = False
        else:
            x = input
            unbatched = x.dim() == 2
            if unbatched:
                x = x.unsqueeze(0)
            elif not self.batch_first:
                x = x.transpose(0, 1)
        batch = x.shape[0]
        h0, c0 = self._initial_state(hx, x, batch, unbatched)

        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                cell = self.cells[index]
                assert isinstance(cell, _Cell)
                seq = x if direction == 0 else _reverse(x, lengths)
                y, h, c = self._run(
                    cell, seq, h0[index], None if c0 is None else c0[index], lengths
                )
                outs.append(y if direction == 0 else _reverse(y, lengths))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            x = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)

        h_out = torch.stack(h_n)
        state: Any = (h_out, torch.stack(c_n)) if self.mode == "LSTM" else h_out
        if packed:
            assert lengths is not None
            output: Any = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        elif unbatched:
            output = x.squeeze(0)
            state = (
                tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)
            )
        else:
            output = x if self.batch_first else x.transpose(0, 1)
        return output, state

    def _initial_state(
        self, hx: Any, x: Tensor, batch: int, unbatched: bool
    ) -> tuple[Tensor, Tensor | None]:
        layers = self.num_layers * self.num_directions
        out = self.proj_size or self.hidden_size
        if hx is None:
            h0 = x.new_zeros(layers, batch, out)
            c0 = x.new_zeros(layers, batch, self.hidden_size) if self.mode == "LSTM" else None
            return h0, c0
        if self.mode == "LSTM":
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        if unbatched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
        return h0, c0

    def _run(
        self, cell: _Cell, x: Tensor, h: Tensor, c: Tensor | None, lengths: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        projected = cell.ih(x)  # [B, T, G*H]: the whole sequence in one call
        outputs = []
        for t in range(x.shape[1]):
            h_new, c_new = self._step(cell, projected[:, t], h, c)
            if lengths is None:
                h, c = h_new, c_new
                outputs.append(h)
            else:  # sequences that have ended keep their state and output zeros
                alive = (t < lengths).to(x.device)[:, None]
                h = torch.where(alive, h_new, h)
                if c is not None and c_new is not None:
                    c = torch.where(alive, c_new, c)
                outputs.append(h_new * alive)
        return torch.stack(outputs, dim=1), h, c

    def _step(
        self, cell: _Cell, gates_x: Tensor, h: Tensor, c: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        gates_h = cell.hh(h)
        if self.mode == "LSTM":
            i, f, g, o = (gates_x + gates_h).chunk(4, dim=1)
            assert c is not None
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if cell.hr is not None:
                h = cell.hr(h)
            return h, c
        if self.mode == "GRU":
            xr, xz, xn = gates_x.chunk(3, dim=1)
            hr, hz, hn = gates_h.chunk(3, dim=1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return (1 - z) * n + z * h, None
        pre = gates_x + gates_h
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), None

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s


class DPRNN(DPRNNBase):
    """Drop-in ``nn.RNN`` (``nonlinearity='tanh'`` or ``'relu'``) for private training."""

    def __init__(self, *args: Any, nonlinearity: str = "tanh", **kwargs: Any) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; use 'tanh' or 'relu'")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", *args, **kwargs)


class DPGRU(DPRNNBase):
    """Drop-in ``nn.GRU`` for private training."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("GRU", *args, **kwargs)


class DPLSTM(DPRNNBase):
    """Drop-in ``nn.LSTM`` (with ``proj_size``) for private training."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("LSTM", *args, **kwargs)
