"""Launch a script under ``torchrun`` for a test: a free port, a time limit, no process left behind."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

from optitrainer.torchrun import run_bounded


def torchrun(
    script: str | Path,
    *script_args: str,
    nproc: int = 2,
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
):
    """Run ``torchrun --standalone --nproc_per_node nproc script args`` and return the finished process.

    Raises ``AssertionError`` with the tail of the output when it fails (unless ``check=False``); on
    timeout the whole process group (launcher and ranks) is killed first.
    """
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [exe, "--standalone", "--nproc_per_node", str(nproc), str(script), *map(str, script_args)]
    return run_launcher(cmd, timeout=timeout, env=env, check=check)


def run_launcher(cmd: list[str], *, timeout: float = 300, env: dict | None = None, check: bool = True):
    """Run a launcher command in its own process group; kill the group if it outlives ``timeout``."""
    code, out = run_bounded(cmd, timeout, {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", **(env or {})})
    if code is None:
        raise AssertionError(f"{cmd[0]} timed out after {timeout}s:\n{out[-4000:]}")
    if check:
        assert code == 0, f"{' '.join(map(str, cmd))} failed ({code}):\n{out[-6000:]}"
    return SimpleNamespace(returncode=code, output=out)
