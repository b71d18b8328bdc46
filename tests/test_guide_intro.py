"""The guide's opening example runs as written (with OptiTrainer in place of Trainer)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_guide_intro_example_runs():
    proc = subprocess.run(
        [sys.executable, "examples/guide/intro.py"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "optim='adamw_torch_fused': final loss after 3 steps" in proc.stdout
