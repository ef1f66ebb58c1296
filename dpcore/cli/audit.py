"""``dpcore audit`` (filled in by the auditing work)."""

from __future__ import annotations

import typer


def audit() -> None:
    """Empirical lower bound on epsilon for the configured plugins, from canaries."""
    typer.echo("dpcore audit: not available yet")
