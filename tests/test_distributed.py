"""DDP smoke test: two CPU processes (gloo) stay identical; layerwise refuses DDP before training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from optitrainer.testing import tiny_llama


def test_two_ranks_end_with_identical_parameters(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    script = Path(__file__).with_name("dist_train.py")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29531", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = dict(tiny_llama(seed=0).named_parameters())
    moved = 0
    for name, p0 in r0["params"].items():
        assert torch.equal(p0, r1["params"][name]), f"{name} differs between ranks"
        moved += not torch.equal(p0, initial[name].detach())
    assert moved == len(initial)  # every parameter trained, identically on both ranks
    assert len(r0["losses"]) == 4
    for r in (r0, r1):
        assert "DDP training: adamw_torch_layerwise supports no distributed mode" in r["refused"]
