"""Plugins written for optitrainer 0.1.0 pass their own tests and `optitrainer check`, unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LEGACY = Path(__file__).with_name("legacy_plugins")
PLUGINS = sorted(p for p in LEGACY.iterdir() if p.is_dir() and any(p.glob("*.dist-info")))


def _run(plugin: Path, *argv: str) -> subprocess.CompletedProcess:
    # the folder on PYTHONPATH stands for `pip install` (its .dist-info holds the entry point)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, *argv], cwd=plugin, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_the_authors_own_tests_pass(plugin, tmp_path):
    proc = _run(
        plugin,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(plugin),
        str(plugin),
        "--basetemp",
        str(tmp_path / "t"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_optitrainer_check_passes(plugin):
    dist = next(plugin.glob("*.dist-info")).name.split("-")[0].replace("_", "-")
    proc = _run(plugin, "-m", "optitrainer.cli", "check", "--dist", dist)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
