"""A clean process exit after training over gloo (CPU data parallelism).

torch's gloo process group destroys each finished collective on its own worker thread, which can take
the GIL: a collective issued during backward (DDP's buckets, the layerwise engine's per-parameter
averages) holds autograd's Python context in the thread-local state it captured, and an all-gather holds
output tensors that Python still references. When the main thread reaches interpreter finalization
before that worker thread got the GIL, the worker is killed inside a destructor and the process aborts
("terminate called without an active exception", SIGABRT) although training finished: torchrun then
reports the launch as failed (pytorch/pytorch#190489; about 1 launch in 20 of
``examples/distributed/train.py`` on a 2-core machine). An exit handler that releases the GIL for a
moment lets those threads finish first. It waits for no other rank, so it cannot hang.
"""

from __future__ import annotations

import atexit
import time

#: how long the exit handler releases the GIL; a waiting worker thread needs microseconds of it
GRACE_SECONDS = 0.1

_registered = False


def _uses_gloo() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and "gloo" in str(dist.get_backend())


def _let_gloo_workers_finish() -> None:
    if _uses_gloo():
        time.sleep(GRACE_SECONDS)  # sleeping releases the GIL to the worker threads waiting for it


def release_gloo_workers_at_exit() -> None:
    """Register (once per process) the exit handler that lets gloo's worker threads finish first.

    ``OptiTrainer.train`` calls it; a script that runs gloo collectives during backward without
    ``OptiTrainer`` may call it too. It does nothing at exit unless a gloo process group is still up.
    """
    global _registered
    if not _registered:
        atexit.register(_let_gloo_workers_finish)
        _registered = True
