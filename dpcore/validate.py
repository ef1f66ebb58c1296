"""``ModuleValidator``: find (and fix) what stops a model from being trained privately.

Each kind of problem is a ``module_fixer`` plugin (see
:class:`~dpcore.protocols.ModuleFixer`): it says why one module is a problem and,
where it can, builds a replacement. ``validate`` lists every problem with its
module path; ``fix`` replaces every module a fixer can replace.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import UnsupportedModuleError
from .registry import get_registry


def _label(path: str, module: nn.Module) -> str:
    return f"{path or '(root)'} ({type(module).__name__})"


class ModuleValidator:
    """Static helpers, as in Opacus: ``validate``, ``is_valid``, ``fix``, ``fix_and_validate``."""

    @staticmethod
    def validate(
        module: nn.Module, *, strict: bool = False, grad_sample_mode: str | None = None
    ) -> list[str]:
        """Every problem, as ``"path (Type): why"``; raises instead if ``strict``.

        With a ``grad_sample_mode`` whose grad sampler declares
        ``needs_layer_grad_samplers = True``, trainable layers without a registered
        layer grad sampler are problems too.
        """
        registry = get_registry()
        fixers = registry.module_fixers()
        problems: list[str] = []
        check_layers = False
        if grad_sample_mode is not None:
            factory = registry.get("grad_sampler", grad_sample_mode).obj
            check_layers = bool(getattr(factory, "needs_layer_grad_samplers", False))
        for path, sub in module.named_modules():
            for _, fixer in fixers:
                why = fixer.problem(sub)
                if why:
                    problems.append(f"{_label(path, sub)}: {why}")
            if check_layers and any(p.requires_grad for p in sub.parameters(recurse=False)):
                if registry.layer_grad_sampler_for(sub) is None:
                    problems.append(
                        f"{_label(path, sub)}: grad_sample_mode {grad_sample_mode!r} has no layer "
                        "grad sampler for this layer type; freeze it, use grad_sample_mode='functorch', "
                        "or register a layer grad sampler (docs/components.md)"
                    )
        if strict and problems:
            raise UnsupportedModuleError(
                "the model cannot be trained privately as it is:\n  - " + "\n  - ".join(problems)
            )
        return problems

    @staticmethod
    def is_valid(module: nn.Module, **kwargs: Any) -> bool:
        return not ModuleValidator.validate(module, **kwargs)

    @staticmethod
    def fix(module: nn.Module) -> nn.Module:
        """The model with every fixable module replaced (weights carried over).

        Works in place on the children and returns the (possibly replaced) root; build
        the optimizer *after* fixing, since replaced modules have new parameters.
        """
        fixers = get_registry().module_fixers()

        def fixed(sub: nn.Module) -> nn.Module:
            for _, fixer in fixers:
                if fixer.problem(sub):
                    try:
                        replacement = fixer.fix(sub)
                    except UnsupportedModuleError:
                        continue  # reported by validate; nothing to replace it with
                    if replacement is not sub:
                        return fixed(replacement)
            return sub

        def walk(parent: nn.Module) -> None:
            for name, child in list(parent.named_children()):
                new = fixed(child)
                if new is not child:
                    setattr(parent, name, new)
                walk(new)

        root = fixed(module)
        walk(root)
        return root

    @staticmethod
    def fix_and_validate(module: nn.Module) -> nn.Module:
        """:meth:`fix`, then :meth:`validate` with ``strict=True``."""
        fixed = ModuleValidator.fix(module)
        ModuleValidator.validate(fixed, strict=True)
        return fixed
