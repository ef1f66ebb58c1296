"""Developer sessions: `nox -s tests lint typecheck docs plugins`."""

from __future__ import annotations

import glob

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"  # install first: a CPU build; never let pip pick a newer CUDA one
PLUGINS = sorted(glob.glob("plugins/*/"))


@nox.session
def tests(session: nox.Session) -> None:
    session.install(TORCH)
    session.install(TORCH, "-e", ".[dev]", *PLUGINS)
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(TORCH)
    session.install(TORCH, "-e", ".[dev]")
    session.run("mypy", "dpcore")


@nox.session
def docs(session: nox.Session) -> None:
    session.install(TORCH)
    session.install(TORCH, "-e", ".[docs]")
    session.run("mkdocs", "build", "--strict")


@nox.session
def plugins(session: nox.Session) -> None:
    session.install(TORCH)
    session.install(TORCH, "-e", ".[dev]", *PLUGINS)
    session.run(
        "pytest", "-q", "tests/plugins", *[f"{p}tests" for p in PLUGINS if glob.glob(f"{p}tests")]
    )
