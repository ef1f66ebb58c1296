"""``dpcore check MODULE:FACTORY``: per-sample gradients against micro-batches.

``MODULE`` is a Python file (``path/to/model.py``) or an importable module
(``mypkg.models``); ``FACTORY`` a function in it taking no arguments and returning
``(model, inputs, targets, loss_fn)``, or a dict with those keys and optionally
``batch_first`` and ``loss_reduction``::

    def factory():
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
        return model, x, y, nn.CrossEntropyLoss()

Every installed grad sampler is checked unless ``--grad-sample-mode`` names some.
Exit code 0: all checked samplers agree with micro-batches; 1: a mismatch, a model
that mixes samples, or no sampler could serve the model (or a named one could not);
2: the target could not be loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import typer

from ._common import console, user_errors


def load_factory(target: str) -> Any:
    """The callable named by ``path/to/file.py:name`` or ``pkg.module:name``."""
    from ..errors import DPCoreError

    module_part, sep, name = target.rpartition(":")
    if not sep or not module_part or not name:
        raise DPCoreError(
            f"expected MODULE:FACTORY (e.g. models.py:make or mypkg.models:make), got {target!r}"
        )
    path = Path(module_part)
    if module_part.endswith(".py") or path.is_file() or "/" in module_part or "\\" in module_part:
        if not path.is_file():
            raise DPCoreError(f"no such file: {module_part}")
        mod_name = f"_dpcore_check_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise DPCoreError(f"cannot import {module_part}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise DPCoreError(f"cannot import module {module_part!r}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise DPCoreError(f"{module_part} has no callable {name!r}")
    return factory


def unpack(made: Any) -> dict[str, Any]:
    from ..errors import DPCoreError

    keys = ("model", "inputs", "targets", "loss_fn")
    if isinstance(made, dict):
        missing = [k for k in keys if k not in made]
        if missing:
            raise DPCoreError(f"the factory's dict lacks {', '.join(missing)}")
        return made
    if isinstance(made, (tuple, list)) and len(made) == 4:
        return dict(zip(keys, made, strict=True))
    raise DPCoreError(
        "the factory must return (model, inputs, targets, loss_fn) or a dict with those keys"
    )


def check(
    target: str = typer.Argument(
        ..., metavar="MODULE:FACTORY", help="path/to/file.py:factory or package.module:factory"
    ),
    grad_sample_mode: list[str] = typer.Option(
        None,
        "--grad-sample-mode",
        "-m",
        help="grad sampler(s) to check (repeatable); default: every installed one",
    ),
    atol: float = typer.Option(1e-5, help="absolute tolerance"),
    rtol: float = typer.Option(1e-4, help="relative tolerance"),
    batch_first: bool | None = typer.Option(
        None,
        "--batch-first/--batch-second",
        help="batch dimension of the inputs (default: factory's, else first)",
    ),
    loss_reduction: str | None = typer.Option(
        None, help="'mean' or 'sum' (default: the factory's, else mean)"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="print every mismatch"),
    as_json: bool = typer.Option(False, "--json", help="print the reports as JSON instead"),
) -> None:
    """Check per-sample gradients of a model against micro-batches of size one."""
    from rich.table import Table

    from ..registry import get_registry
    from ..verify import check_per_sample_gradients

    with user_errors():
        made = unpack(load_factory(target)())
        registry = get_registry()
        modes = list(grad_sample_mode) if grad_sample_mode else registry.names("grad_sampler")
        for mode in modes:
            registry.get("grad_sampler", mode)  # unknown names fail before any work
        bf = batch_first if batch_first is not None else bool(made.get("batch_first", True))
        reduction = loss_reduction or made.get("loss_reduction", "mean")

        reports = [
            check_per_sample_gradients(
                made["model"],
                made["inputs"],
                made["targets"],
                made["loss_fn"],
                mode,
                atol=atol,
                rtol=rtol,
                batch_first=bf,
                loss_reduction=reduction,
            )
            for mode in modes
        ]

    if as_json:
        import dataclasses
        import json

        payload = [dataclasses.asdict(r) | {"ok": r.ok} for r in reports]
        typer.echo(json.dumps(payload, indent=2, default=str))
        served = [r for r in reports if r.error is None]
        bad = any(r.mismatches or r.batch_mixing for r in reports)
        raise typer.Exit(
            1 if bad or not served or (grad_sample_mode and len(served) < len(reports)) else 0
        )

    table = Table(title=f"per-sample gradients of {target} vs micro-batches")
    table.add_column("grad sampler")
    table.add_column("result")
    table.add_column("max error", justify="right")
    table.add_column("details", overflow="fold")
    failed = False
    for report in reports:
        if report.batch_mixing:
            result, failed = "[red]MIXES SAMPLES[/]", True
            details = report.mixing_details
        elif report.error is not None:
            result = "[yellow]unsupported[/]"
            details = report.error
        elif report.mismatches:
            result, failed = "[red]MISMATCH[/]", True
            names = report.mismatched_parameters
            details = ", ".join(names[:6]) + (
                f" (+{len(names) - 6} more)" if len(names) > 6 else ""
            )
            if report.hints:
                details += f"\n{report.hints[0]}"
        else:
            result, details = "[green]OK[/]", f"{len(report.parameters)} parameters"
        table.add_row(report.grad_sample_mode, result, f"{report.max_abs_error:.2g}", details)
    console.print(table)
    if verbose:
        for report in reports:
            if not report.ok:
                console.print(report.summary(), highlight=False, soft_wrap=True)
    served = [r for r in reports if r.error is None]
    if not served:
        console.print("[red]no grad sampler could serve this model[/]")
        failed = True
    elif grad_sample_mode and len(served) < len(reports):
        failed = True  # a sampler the user asked for cannot serve the model
    raise typer.Exit(1 if failed else 0)
