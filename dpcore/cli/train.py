"""``dpcore train``: config-driven private training (see :mod:`dpcore.train`)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer

from ._common import console, user_errors


def train(
    config: Optional[Path] = typer.Argument(
        None,
        help="TOML config (engine keys plus a \\[train] table). Omit to run the built-in "
        "example (a small CNN on scikit-learn's 8x8 digits), or with --resume and --run-dir "
        "to continue that run with its recorded config.json.",
        show_default=False,
    ),
    resume: Optional[str] = typer.Option(
        None,
        "--resume",
        help="'auto': continue from the newest valid checkpoint in the run directory (start "
        "fresh if there is none); or the path of a checkpoint file.",
    ),
    run_dir: Optional[Path] = typer.Option(
        None,
        "--run-dir",
        help="Where checkpoints, metrics.jsonl and model.pt go \\[default: runs/<config name>].",
    ),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", min=1, help="Total epochs (overrides \\[train] epochs)."
    ),
    allow_config_change: bool = typer.Option(
        False,
        "--allow-config-change",
        help="Resume from a checkpoint written with another privacy configuration; epsilon "
        "then composes both phases.",
    ),
    progress: Optional[bool] = typer.Option(
        None, "--progress/--no-progress", help="Progress bars \\[default: when on a terminal]."
    ),
    audit: Optional[int] = typer.Option(
        None,
        "--audit",
        min=2,
        help="Insert this many canaries and report one-run lower "
        "bounds on epsilon at the end (see docs/auditing.md).",
    ),
    print_default_config: bool = typer.Option(
        False, "--print-default-config", help="Print the built-in example's config and exit."
    ),
) -> None:
    """Config-driven private training; with no config, the built-in example.

    SIGTERM or SIGINT (Ctrl-C) finishes the current step, writes a checkpoint and
    exits; continue with --resume auto.
    """
    if print_default_config:
        from ..examples.digits import DEFAULT_CONFIG_TOML

        typer.echo(DEFAULT_CONFIG_TOML, nl=False)
        return
    from ..distributed import process_group_from_env
    from ..train import train as run_training

    # [distributed owner] under torchrun, join the process group for the whole run
    with user_errors(), process_group_from_env():
        result = run_training(
            config,
            resume=resume,
            run_dir=run_dir,
            epochs=epochs,
            allow_config_change=allow_config_change,
            console=console,
            progress=progress,
            audit=audit,
        )
    if result.stopped == "interrupted" and result.signal is not None:
        # Conventional exit status of a process ended by a signal (130 for SIGINT, 143 for
        # SIGTERM), so schedulers and shells see that the run did not finish.
        raise typer.Exit(128 + int(signal.Signals[result.signal]))
