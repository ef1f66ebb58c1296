"""``dpcore check`` (filled in by the per-sample gradient work)."""

from __future__ import annotations

import typer


def check() -> None:
    """Check per-sample gradients of a model against micro-batches of size one."""
    typer.echo("dpcore check: not available yet")
