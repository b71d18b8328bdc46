"""The ``optitrainer`` command line."""

from __future__ import annotations

import subprocess
import sys


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "optitrainer.cli", *argv],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_list_shows_names_modes_provenance_and_summary():
    out = cli("list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    row = next(line for line in lines if line.startswith("│ adamw_torch "))
    assert (
        "standard, layerwise" in row
        and "optitrainer 0.1.0" in row
        and "yes" in row
        and "torch.optim.AdamW" in row
    )
    muon = next(line for line in lines if line.startswith("│ muon "))
    assert "layerwise" not in muon


def test_info_shows_typed_options_and_defaults():
    out = cli("info", "sgd")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "provided by: optitrainer 0.1.0" in text and "modes: standard, sgd_layerwise" in text
    assert "momentum" in text and "float in [0, inf]" in text and "nesterov" in text and "False" in text


def test_info_unknown_name_suggests_and_fails():
    out = cli("info", "sgdd")
    assert out.returncode == 2
    assert "Did you mean: 'sgd'" in out.stdout
