"""``dpcore epsilon`` and ``dpcore noise`` (filled in by the accounting work)."""

from __future__ import annotations

import typer


def epsilon() -> None:
    """Privacy spent (epsilon) for a sample rate, noise multiplier and number of steps."""
    typer.echo("dpcore epsilon: not available yet")


def noise() -> None:
    """Noise multiplier that meets a target epsilon."""
    typer.echo("dpcore noise: not available yet")
