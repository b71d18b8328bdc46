"""Shared fixtures: quiet CPU runs and throw-away plugin distributions on sys.path."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    """Create installed-looking distributions (``.dist-info`` + module) that declare entry points.

    ``make(dist, version, {name: "module:ATTR"}, {module: source})`` returns the folder; the
    returned :class:`Registry` factory gives a registry that sees them.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[optitrainer.optimizers]\n{eps}\n")
        for mod, src in modules.items():
            (site / f"{mod}.py").write_text(textwrap.dedent(src))
        return info

    yield make
    for mod in [m for m in sys.modules if m.startswith("fakeplug")]:
        del sys.modules[mod]
