"""Normalisation layers that mix samples or keep data-dependent running statistics."""

from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from dpcore.errors import UnsupportedModuleError

#: GroupNorm groups used in place of BatchNorm (the largest divisor of C up to this)
MAX_GROUPS = 32


class BatchNormFixer:
    """BatchNorm (and SyncBatchNorm) -> GroupNorm with the same affine parameters."""

    def problem(self, module: nn.Module) -> str | None:
        if isinstance(module, _BatchNorm):
            return (
                "BatchNorm normalises each sample with statistics of the whole batch, so one "
                "sample's gradient depends on the others and cannot be clipped alone; "
                "ModuleValidator.fix replaces it with GroupNorm"
            )
        return None

    def fix(self, module: nn.Module) -> nn.Module:
        assert isinstance(module, _BatchNorm)
        channels = module.num_features
        groups = math.gcd(MAX_GROUPS, channels)
        new = nn.GroupNorm(groups, channels, eps=module.eps, affine=module.affine)
        if module.affine:
            new.weight.data.copy_(module.weight.data)
            new.bias.data.copy_(module.bias.data)
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new.to(device=_device(module), dtype=_dtype(module))


class InstanceNormFixer:
    """InstanceNorm with ``track_running_stats=True`` -> the same layer without them."""

    def problem(self, module: nn.Module) -> str | None:
        if isinstance(module, _InstanceNorm) and module.track_running_stats:
            return (
                "InstanceNorm with track_running_stats=True keeps running statistics of the "
                "training data in buffers, which are released with the model without noise; "
                "ModuleValidator.fix turns the running statistics off"
            )
        return None

    def fix(self, module: nn.Module) -> nn.Module:
        assert isinstance(module, _InstanceNorm)
        new = type(module)(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,  # type: ignore[arg-type]
            affine=module.affine,
            track_running_stats=False,
        )
        if module.affine:
            new.weight.data.copy_(module.weight.data)
            new.bias.data.copy_(module.bias.data)
        return new.to(device=_device(module), dtype=_dtype(module))


class TrainableBuffersCheck:
    """A trainable layer that also keeps buffers (cannot be fixed automatically).

    Buffers that a layer updates from its inputs (running statistics, caches) are
    released with the model but not privatised. BatchNorm and InstanceNorm are left
    to their own fixers.
    """

    def problem(self, module: nn.Module) -> str | None:
        if isinstance(module, (_BatchNorm, _InstanceNorm)):
            return None
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        buffers = [n for n, _ in module.named_buffers(recurse=False)]
        if trainable and buffers:
            return (
                f"trainable layer with buffers {buffers}: if forward updates them from the data, "
                "they leak it without noise; make them constants outside the layer, or freeze the "
                "layer's parameters"
            )
        return None

    def fix(self, module: nn.Module) -> nn.Module:
        raise UnsupportedModuleError("no automatic fix for a trainable layer with buffers")


def _device(module: nn.Module):  # type: ignore[no-untyped-def]
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


def _dtype(module: nn.Module):  # type: ignore[no-untyped-def]
    p = next(module.parameters(), None)
    return p.dtype if p is not None else None
