"""Shared helpers of the CLI commands."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn dpcore's own errors (and pydantic validation errors) into a clear message and
    exit code 2, instead of a traceback."""
    from pydantic import ValidationError

    from ..errors import DPCoreError

    try:
        yield
    except (DPCoreError, ValidationError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
