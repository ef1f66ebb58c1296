"""``dpcore train`` (filled in by the training work)."""

from __future__ import annotations

import typer


def train() -> None:
    """Config-driven private training; with no config, the built-in example."""
    typer.echo("dpcore train: private training is not available yet in this version.")
