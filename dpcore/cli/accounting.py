"""``dpcore epsilon`` and ``dpcore noise``: privacy spent, and the noise for a budget.

Both commands validate their inputs with the accountants' own checks, so a bad sample
rate, noise multiplier or delta is one clear line and exit code 2 (no traceback).
Each command gathers its answer into a plain dict (printed as a table or as JSON),
so adding an option means adding a parameter and a field.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import typer
from rich.table import Table

from ._common import console, err_console, user_errors

_ACCOUNTANT_HELP = "Accountant plugin (see `dpcore list-plugins --kind accountant`)."
_OPTION_HELP = (
    "Accountant option as KEY=VALUE (repeatable), e.g. -o eps_error=0.001; "
    "VALUE is read as JSON when it parses, else as a string."
)


def _parse_options(pairs: list[str] | None) -> dict[str, Any]:
    from ..errors import ConfigError

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"accountant options are KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options


@contextlib.contextmanager
def _warnings_as_notes() -> Iterator[None]:
    """Show warnings (e.g. gdp's approximation) as one plain line each on stderr."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    for message in dict.fromkeys(str(w.message) for w in seen):
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _number(x: float) -> Any:
    """JSON has no infinity: write it as the string "inf"."""
    return x if math.isfinite(x) else "inf"


def _emit(title: str, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(
            json.dumps(
                {k: _number(v) if isinstance(v, float) else v for k, v in result.items()}, indent=2
            )
        )
        return
    table = Table(title=title, show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    for key, value in result.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
        table.add_row(key.replace("_", " "), _fmt(value))
    console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else "inf"
    return str(value)


def epsilon(
    sample_rate: float = typer.Option(
        ..., "--sample-rate", "-q", help="Probability that an example is in a batch, in (0, 1]."
    ),
    noise_multiplier: float = typer.Option(
        ..., "--sigma", "-s", "--noise-multiplier", help="Noise multiplier sigma (> 0)."
    ),
    steps: int = typer.Option(..., "--steps", "-n", help="Number of optimizer steps."),
    delta: float = typer.Option(..., "--delta", "-d", help="Target delta, in (0, 1)."),
    accountant: str = typer.Option("prv", "--accountant", "-a", help=_ACCOUNTANT_HELP),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help=_OPTION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Privacy spent (epsilon) for a sample rate, noise multiplier and number of steps."""
    from ..accounting import (
        check_delta,
        check_noise_multiplier,
        check_sample_rate,
        check_steps,
        create_accountant,
    )

    with user_errors(), _warnings_as_notes():
        q = check_sample_rate(sample_rate)
        sigma = check_noise_multiplier(noise_multiplier, allow_zero=False)
        n = check_steps(steps)
        d = check_delta(delta)
        acc = create_accountant(accountant, **_parse_options(option))
        acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
        result: dict[str, Any] = {
            "accountant": accountant,
            "epsilon": float(acc.get_epsilon(d)),
            "delta": d,
            "sample_rate": q,
            "noise_multiplier": sigma,
            "steps": n,
        }
        # Extra answers some accountants give (bounds, best Rényi order).
        if hasattr(acc, "get_epsilon_bounds"):
            bounds = acc.get_epsilon_bounds(d)
            result["epsilon_lower"] = float(bounds.lower)
            result["epsilon_estimate"] = float(bounds.estimate)
        if hasattr(acc, "get_privacy_spent"):
            result["best_order"] = float(acc.get_privacy_spent(d)[1])
    _emit("privacy spent", result, as_json)


def noise(
    target_epsilon: float = typer.Option(
        ..., "--target-epsilon", "-e", help="Budget to spend over the whole run (> 0)."
    ),
    sample_rate: float = typer.Option(
        ..., "--sample-rate", "-q", help="Probability that an example is in a batch, in (0, 1]."
    ),
    steps: int = typer.Option(..., "--steps", "-n", help="Number of optimizer steps (>= 1)."),
    delta: float = typer.Option(..., "--delta", "-d", help="Target delta, in (0, 1)."),
    accountant: str = typer.Option("prv", "--accountant", "-a", help=_ACCOUNTANT_HELP),
    tolerance: float = typer.Option(
        0.01, "--tolerance", help="Spend at least target - tolerance (and at most the target)."
    ),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help=_OPTION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    bands: Optional[int] = typer.Option(
        None,
        "--bands",
        min=1,
        help="BandMF noise with this many bands and cyclic Poisson "
        "sampling over as many groups: calibrated as DP-SGD with ceil(steps / bands) steps at "
        "rate bands x q (docs/correlated-noise.md).",
    ),
    choose_bands: bool = typer.Option(
        False,
        "--choose-bands",
        help="Table of BandMF band counts for this budget: noise, "
        "expected prefix-sum error relative to DP-SGD, and the best choice.",
    ),
) -> None:
    """Noise multiplier that meets a target epsilon."""
    from ._bands import bands_event, choose_bands_report, emit_choose_bands

    with user_errors(), _warnings_as_notes():
        if choose_bands:
            report = choose_bands_report(
                target_epsilon=target_epsilon,
                sample_rate=sample_rate,
                steps=steps,
                delta=delta,
                accountant=accountant,
                tolerance=tolerance,
                options=_parse_options(option),
            )
        else:
            rate, events = (
                (sample_rate, steps) if bands is None else bands_event(sample_rate, steps, bands)
            )
            result = calibrate_noise(
                target_epsilon=target_epsilon,
                sample_rate=rate,
                steps=events,
                delta=delta,
                accountant=accountant,
                tolerance=tolerance,
                options=_parse_options(option),
            )
            if bands is not None:  # BandMF: say which DP-SGD event it was calibrated as
                result.update(
                    bands=bands,
                    sample_rate=sample_rate,
                    steps=steps,
                    accounted_rate=rate,
                    accounted_steps=events,
                )
    if choose_bands:
        emit_choose_bands(report, as_json)
        return
    _emit("noise for a budget", result, as_json)


def calibrate_noise(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str,
    tolerance: float,
    options: dict[str, Any],
) -> dict[str, Any]:
    """What ``dpcore noise`` prints: the calibrated sigma and the epsilon it spends."""
    from ..accounting import (
        check_delta,
        check_sample_rate,
        check_steps,
        compute_epsilon,
        get_noise_multiplier,
    )
    from ..errors import AccountingError

    q = check_sample_rate(sample_rate)
    d = check_delta(delta)
    n = check_steps(steps)
    if n < 1:
        raise AccountingError("steps must be at least 1")
    sigma = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=d,
        sample_rate=q,
        steps=n,
        accountant=accountant,
        epsilon_tolerance=tolerance,
        **options,
    )
    spent = compute_epsilon(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=n,
        delta=d,
        accountant=accountant,
        **options,
    )
    return {
        "accountant": accountant,
        "noise_multiplier": sigma,
        "epsilon": spent,
        "target_epsilon": float(target_epsilon),
        "delta": d,
        "sample_rate": q,
        "steps": n,
    }
