"""The quick start's training example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_quickstart_training_example_runs(capsys):
    from dpcore.registry import get_registry

    if "prv" not in get_registry().names("accountant"):
        pytest.skip("the prv accountant is not installed")
    code = _blocks("quickstart.md")[0]
    assert "make_private" in code
    exec(compile(code, "docs/quickstart.md", "exec"), {})
    out = capsys.readouterr().out
    epsilons = [float(m) for m in re.findall(r"ε = ([0-9.]+)", out)]
    assert len(epsilons) == 3 and epsilons == sorted(epsilons) and epsilons[0] > 0
