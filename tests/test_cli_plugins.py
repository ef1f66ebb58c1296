"""`dpcore --version`, `list-plugins`, `config-schema`."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

import dpcore
from dpcore.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"dpcore {dpcore.__version__}"


def test_list_plugins_json_has_builtins_with_provider_and_status():
    result = runner.invoke(app, ["list-plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    builtin = [r for r in rows if r["provider"] == "dpcore"]
    assert builtin, "no built-in plugins listed"
    for row in builtin:
        assert row["status"] == "ok" and row["version"] == dpcore.__version__
        assert set(row) >= {"kind", "name", "provider", "version", "status", "description"}


def test_list_plugins_table_and_kind_filter():
    result = runner.invoke(app, ["list-plugins", "--kind", "accountant"])
    assert result.exit_code == 0
    assert "dpcore plugins" in result.output
    bad = runner.invoke(app, ["list-plugins", "--kind", "acountant"])
    assert bad.exit_code == 2 and "unknown plugin kind 'acountant'" in bad.output


def test_config_schema_is_json_schema():
    result = runner.invoke(app, ["config-schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert schema["title"] == "EngineConfig"
    assert {"grad_sampler", "accountant", "noise_multiplier"} <= set(schema["properties"])


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "dpcore", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("dpcore ")
