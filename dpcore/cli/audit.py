"""``dpcore audit``: an empirical lower bound on epsilon for the configured plugins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from ._common import console, user_errors

#: defaults of the synthetic audit (overridden by an [audit] table, then by the flags)
AUDIT_DEFAULTS: dict[str, Any] = {
    "canaries": 1000,
    "steps": 100,
    "sample_rate": 0.1,
    "alpha": 0.05,
    "selection": "grid",
}


def audit(
    config: Optional[Path] = typer.Argument(
        None,
        help="TOML config: engine keys, optionally an \\[audit] table (canaries, steps, "
        "sample_rate, alpha, selection). Omit to audit the built-in example's config.",
        show_default=False,
    ),
    canaries: Optional[int] = typer.Option(
        None, "--canaries", "-m", min=2, help="Number of canaries (default 1000)."
    ),
    steps: Optional[int] = typer.Option(
        None, "--steps", "-t", min=1, help="Optimizer steps of the audited run (default 100)."
    ),
    sample_rate: Optional[float] = typer.Option(
        None, "--sample-rate", "-q", help="Sampling rate (default 0.1)."
    ),
    alpha: Optional[float] = typer.Option(
        None, "--alpha", help="1 - confidence of the lower bounds (default 0.05)."
    ),
    selection: Optional[str] = typer.Option(
        None, "--selection", help="How the number of guesses is chosen: grid or split."
    ),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Seed of the audited run (default the config's seed)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the AuditReport as JSON."),
) -> None:
    """Empirical lower bound on epsilon for the configured plugins, from canaries.

    Runs the configured pipeline for a few steps on a synthetic model, with Dirac
    canaries entering before the clipper, and tests the claimed epsilon against what
    the canaries' scores reveal. Exit code 1 when the bound exceeds the claim or the
    canaries' separation does not match the configured noise.
    """
    from ..audit.run import run_audit
    from ..config import EngineConfig, load_toml

    with user_errors():
        if config is None:
            import tomllib

            from ..examples.digits import DEFAULT_CONFIG_TOML

            data = tomllib.loads(DEFAULT_CONFIG_TOML)
        else:
            data = load_toml(config)
        settings = dict(AUDIT_DEFAULTS)
        table = data.get("audit", {})
        unknown = set(table) - set(AUDIT_DEFAULTS)
        if unknown:
            from ..errors import ConfigError

            raise ConfigError(
                f"[audit] has unknown key(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(AUDIT_DEFAULTS)}"
            )
        settings.update(table)
        given = {
            "canaries": canaries,
            "steps": steps,
            "sample_rate": sample_rate,
            "alpha": alpha,
            "selection": selection,
        }
        settings.update({k: v for k, v in given.items() if v is not None})
        cfg = EngineConfig.from_dict(data)
        report = run_audit(cfg, seed=seed, **settings)

    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_table(report)
    if not report.passed:
        raise typer.Exit(1)


def _print_table(report: Any) -> None:
    from rich.table import Table

    plugins = ", ".join(f"{k}={v}" for k, v in report.plugins.items())
    table = Table(title="dpcore audit", caption=plugins)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    confidence = f"{100 * (1 - report.alpha):g}%"
    table.add_row(
        "claimed epsilon",
        f"{report.claimed_epsilon:.4f}",
        f"the accountant's, at delta={report.delta:g} after {report.steps} steps",
    )
    table.add_row(
        "epsilon lower bound (one run)",
        _fmt(report.epsilon_lower_bound),
        f"{confidence} confidence; {report.correct}/{report.guesses} guesses right",
    )
    table.add_row(
        "epsilon lower bound (f-DP)",
        _fmt(report.epsilon_lower_bound_fdp),
        f"Gaussian trade-off, mu >= {report.mu_lower_bound_fdp:.3f} (informative)",
    )
    table.add_row(
        "most this audit can certify",
        _fmt(report.epsilon_ceiling),
        f"perfect guessing with {report.canaries} canaries",
    )
    table.add_row("mu_hat", _fmt(report.mu_hat), "(mean_in - mean_out) / sd_out of the scores")
    table.add_row(
        "mu expected",
        f"{_fmt(report.mu_expected)} ± {_fmt(report.mu_tolerance)}",
        "from the noise, sampling rate and steps (false alarm 1/1000)",
    )
    verdict = "[green]pass[/]" if report.passed else "[bold red]FAIL[/]"
    table.add_row("verdict", verdict, "")
    console.print(table)
    for reason in report.reasons:
        console.print(f"[red]-[/] {reason}", highlight=False)


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.4f}"  # nan check without math
