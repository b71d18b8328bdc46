"""Gradient averaging for engines that consume gradients inside the backward pass (layerwise, fused).

Under DDP the trainer runs such steps inside ``DistributedDataParallel.no_sync()`` (DDP's own
reducer would average after the hooks already stepped on local gradients); each per-parameter hook
averages its gradient across ranks itself, just before the update. Under FSDP2 the hooks already
receive the reduce-scattered shard gradient, so there is nothing to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .engine import Engine


def _no_average(grad: torch.Tensor) -> None:
    return None


def gradient_averager(engine: Engine) -> Callable[[torch.Tensor], None]:
    """``average(grad)`` in place across the data-parallel ranks, as DDP computes it."""
    if engine.kind != "ddp" or engine.world_size < 2:
        return _no_average
    import torch.distributed as dist

    world_size = engine.world_size

    def average(grad: torch.Tensor) -> None:
        # DDP divides before summing (its bucket pre-division); the same order gives the same bits
        grad.div_(world_size)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)

    return average


@contextlib.contextmanager
def without_ddp_reduction(model: torch.nn.Module) -> Iterator[None]:
    """Turn DDP's own gradient reduction off for one forward/backward (no-op for any other model)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield
