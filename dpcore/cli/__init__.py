"""The ``dpcore`` command line (typer + rich).

Each command lives in its own module of this package and imports heavy
dependencies (torch) inside the command, so ``dpcore --help`` stays fast.
"""

from __future__ import annotations

import typer

from .. import __version__
from . import accounting, audit, check, plugins, train

app = typer.Typer(
    name="dpcore",
    help="Differentially private training for PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dpcore {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Differentially private training for PyTorch."""


app.command("list-plugins")(plugins.list_plugins)
app.command("config-schema")(plugins.config_schema_cmd)
app.command("epsilon")(accounting.epsilon)
app.command("noise")(accounting.noise)
app.command("check")(check.check)
app.command("train")(train.train)
app.command("audit")(audit.audit)


def main() -> None:
    app()
