"""Run ``torchrun`` for a bounded time: the launcher and every rank it started die with it at the limit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def run_torchrun(
    script_args: Sequence[str], nproc: int, timeout: float, env: dict[str, str] | None = None
) -> tuple[int | None, str]:
    """``torchrun --standalone --nproc_per_node nproc *script_args`` on this machine's loopback.

    Returns the exit code (``None`` when it was killed at ``timeout``) and the output of every rank.
    """
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [exe, "--standalone", "--nproc_per_node", str(nproc), *map(str, script_args)]
    return run_bounded(cmd, timeout, {"MASTER_ADDR": "127.0.0.1", **(env or {})})


def run_bounded(
    cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[int | None, str]:
    """Run a launcher (``torchrun``, ``accelerate launch``) in its own process group, killed at ``timeout``.

    Returns the exit code (``None`` when it was killed) and its output; nothing it started is left behind.
    """
    proc = subprocess.Popen(
        list(map(str, cmd)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        text, _ = proc.communicate(timeout=timeout)
        return proc.returncode, text
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks
        text, _ = proc.communicate()
        return None, text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
