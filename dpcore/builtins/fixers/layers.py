"""torch's recurrent layers and MultiheadAttention -> dpcore's DP layers.

torch's fused RNN kernels and ``nn.MultiheadAttention``'s functional core hide
the per-sample computation from grad samplers; :mod:`dpcore.layers` provides
drop-in versions built from layers with per-sample gradients. Weights are copied
through ``state_dict`` (the DP layers accept torch's parameter names) and
``requires_grad`` through the DP layers' ``torch_parameter_names()``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dpcore.errors import UnsupportedModuleError


def _dp_class(name: str) -> Any:
    try:
        import dpcore.layers as layers

        return getattr(layers, name)
    except (ImportError, AttributeError) as exc:
        raise UnsupportedModuleError(f"dpcore.layers.{name} is not available: {exc}") from exc


class _ReplaceWithDP:
    torch_type: type[nn.Module] = nn.Module
    dp_name = ""

    def problem(self, module: nn.Module) -> str | None:
        if type(module) is self.torch_type:
            return (
                f"torch's {self.torch_type.__name__} computes in fused kernels that hide per-sample "
                f"gradients; ModuleValidator.fix replaces it with dpcore.layers.{self.dp_name} "
                "(same weights)"
            )
        return None

    def build(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def fix(self, module: nn.Module) -> nn.Module:
        new = self.build(module)
        try:
            new.load_state_dict(module.state_dict())
        except RuntimeError as exc:
            raise UnsupportedModuleError(
                f"could not copy the weights of {type(module).__name__} into "
                f"{type(new).__name__}: {exc}"
            ) from exc
        p = next(module.parameters(), None)
        if p is not None:
            new = new.to(device=p.device, dtype=p.dtype)
        _copy_requires_grad(module, new)
        return new


def _copy_requires_grad(old: nn.Module, new: nn.Module) -> None:
    """Frozen torch parameters stay frozen: the DP layers name their parameters
    differently (``weight_ih_l0`` -> ``cells.0.ih.weight``, ``in_proj_weight`` -> the
    three ``{q,k,v}_proj.weight``) and say how through ``torch_parameter_names()``."""
    mapping = getattr(new, "torch_parameter_names", None)
    names: dict[str, list[str]] = mapping() if mapping is not None else {}
    new_params = dict(new.named_parameters())
    for name, old_p in old.named_parameters():
        for ours in names.get(name, [name]):
            if ours in new_params:
                new_params[ours].requires_grad_(old_p.requires_grad)


def _rnn_kwargs(module: nn.RNNBase) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        input_size=module.input_size,
        hidden_size=module.hidden_size,
        num_layers=module.num_layers,
        bias=module.bias,
        batch_first=module.batch_first,
        dropout=module.dropout,
        bidirectional=module.bidirectional,
    )
    if getattr(module, "proj_size", 0):
        kwargs["proj_size"] = module.proj_size
    return kwargs


class LSTMFixer(_ReplaceWithDP):
    torch_type = nn.LSTM
    dp_name = "DPLSTM"

    def build(self, module: nn.Module) -> nn.Module:
        assert isinstance(module, nn.LSTM)
        return _dp_class(self.dp_name)(**_rnn_kwargs(module))


class GRUFixer(_ReplaceWithDP):
    torch_type = nn.GRU
    dp_name = "DPGRU"

    def build(self, module: nn.Module) -> nn.Module:
        assert isinstance(module, nn.GRU)
        return _dp_class(self.dp_name)(**_rnn_kwargs(module))


class RNNFixer(_ReplaceWithDP):
    torch_type = nn.RNN
    dp_name = "DPRNN"

    def build(self, module: nn.Module) -> nn.Module:
        assert isinstance(module, nn.RNN)
        return _dp_class(self.dp_name)(nonlinearity=module.nonlinearity, **_rnn_kwargs(module))


class MultiheadAttentionFixer(_ReplaceWithDP):
    torch_type = nn.MultiheadAttention
    dp_name = "DPMultiheadAttention"

    def build(self, module: nn.Module) -> nn.Module:
        assert isinstance(module, nn.MultiheadAttention)
        return _dp_class(self.dp_name)(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
        )
