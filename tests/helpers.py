"""Test helpers: build and install small throwaway plugin distributions for real."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import textwrap
from pathlib import Path


def write_distribution(
    root: Path, dist: str, package: str, entry_points: dict[str, str], code: str
) -> Path:
    """A minimal installable distribution exposing ``entry_points`` in group ``dpcore``."""
    src = root / dist
    (src / package).mkdir(parents=True)
    eps = "\n".join(f'{name} = "{target}"' for name, target in entry_points.items())
    (src / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "1.2.3"

        [project.entry-points.dpcore]
        """)
        + eps
        + "\n"
    )
    (src / package / "__init__.py").write_text(textwrap.dedent(code))
    return src


def pip_install_into(target: Path, *sources: Path) -> None:
    """``pip install --target`` so the test never changes the shared environment."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            *map(str, sources),
        ],
        check=True,
    )


def entry_points_in(path: Path) -> list[md.EntryPoint]:
    eps: list[md.EntryPoint] = []
    for dist in md.distributions(path=[str(path)]):
        eps.extend(ep for ep in dist.entry_points if ep.group == "dpcore")
    return eps
