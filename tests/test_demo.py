"""The README's demo runs offline and prints its comparison."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_compares(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--steps", "6", "--optim", "adamw_torch,sgd"],
        capture_output=True,
        text=True,
        timeout=600,
        env={"COLUMNS": "140", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "adamw_torch" in table and "sgd" in table and "eval loss" in table
