"""The core promise: pip-install a plugin distribution and its name works, optitrainer untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

TRAIN = """
from optitrainer import OptiTrainer, OptiTrainingArguments, get_optimizer
from optitrainer.testing import SyntheticLMDataset, tiny_llama, assert_learns, run_training
r = get_optimizer("signum")
print("provenance", r.provenance)
run = run_training("signum", {out!r}, steps=30, learning_rate=3e-3, optim_args="momentum=0.95")
assert_learns(run)
assert type(run.trainer.optimizer.optimizer).__name__ == "Signum"
lw = run_training("signsgd_momentum_layerwise", {out!r} + "-lw", steps=3)
print("layerwise", type(lw.trainer.optimizer.optimizer).__name__)
"""


@pytest.fixture
def installed_plugin(tmp_path):
    already = subprocess.run([*PIP, "show", "optitrainer-signum"], capture_output=True).returncode == 0
    if not already:
        proc = subprocess.run(
            [*PIP, "install", "--no-deps", "--no-build-isolation", str(PLUGIN_DIR)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    yield
    if not already:
        subprocess.run([*PIP, "uninstall", "-y", "optitrainer-signum"], capture_output=True)


def test_pip_installed_plugin_trains_by_name(installed_plugin, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN.format(out=str(tmp_path / "run"))], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "provenance optitrainer-signum 0.1.0" in proc.stdout
    assert "layerwise LayerwiseOptimizer" in proc.stdout
    listing = subprocess.run(
        [sys.executable, "-m", "optitrainer.cli", "list"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200"},
    )
    assert "│ signum " in listing.stdout and "optitrainer-signum 0.1.0" in listing.stdout


def test_pip_installed_plugin_passes_optitrainer_check(installed_plugin, tmp_path):
    """The whole kit over the plugin's names, as its author (and CI) runs it: every claim exercised."""
    proc = subprocess.run(
        [sys.executable, "-m", "optitrainer.cli", "check", "--dist", "optitrainer-signum"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        cwd=tmp_path,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    for line in (
        "passed  signum learns: loss",
        "at lr 0.001",  # its recommended_lr
        "passed  signum options: momentum=",
        "passed  signum_layerwise layerwise_exact",
        "passed  signum distributed:ddp: ranks identical",
        "passed  signum_layerwise distributed:ddp: ranks identical",
        "not runnable here  signum fp16",
    ):
        assert line in out, (line, out[-4000:])
    assert " 0 failed" in out
