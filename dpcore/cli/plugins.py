"""``dpcore list-plugins`` and ``dpcore config-schema``."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from ._common import console, user_errors


def list_plugins(
    kind: Optional[str] = typer.Option(None, "--kind", "-k", help="Only this kind."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    show_all: bool = typer.Option(
        False, "--all", help="Also show details and failed or disabled plugins' causes."
    ),
) -> None:
    """Every installed plugin: its kind, provider, version and status."""
    from ..registry import get_registry

    with user_errors():
        registry = get_registry()
        infos = [i for i in registry.describe() if kind is None or i.kind in (kind, "?")]
        if kind is not None:
            registry.names(kind)  # validates the kind
    if as_json:
        typer.echo(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    table = Table(title="dpcore plugins")
    for col in ("kind", "name", "provider", "version", "status"):
        table.add_column(col)
    table.add_column("description" if not show_all else "description / details / error")
    for i in infos:
        status = {"ok": "[green]ok[/]", "failed": "[red]failed[/]"}.get(i.status, i.status)
        text = i.description
        if i.error:
            text = f"[red]{i.error}[/]"
        elif show_all and i.details:
            text = f"{text}\n[dim]{i.details}[/]"
        table.add_row(i.kind, i.name, i.provider, i.version, status, text)
    console.print(table)
    failed = [i for i in infos if i.status == "failed"]
    if failed and not show_all:
        console.print(f"[red]{len(failed)} plugin(s) failed to load[/]; see the error column.")


def config_schema_cmd() -> None:
    """Print the JSON Schema of the engine configuration with the installed plugins."""
    from ..config import config_schema

    with user_errors():
        typer.echo(json.dumps(config_schema(), indent=2))
