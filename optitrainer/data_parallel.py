"""Data parallelism for engines that consume gradients inside the backward pass (layerwise, fused).

Under DDP each per-parameter hook averages its gradient across ranks itself, just before the update
(:func:`gradient_averager`). DDP's wrapper would only be in the way: its reducer averages after the
hooks already stepped, and it allocates gradient buckets as large as every gradient together when it
wraps the model, which would undo the memory layerwise training saves. So the trainer keeps the model
unwrapped (:func:`replicate_without_ddp`: the initial weights are broadcast from rank 0, as DDP does),
and runs a DDP-wrapped model it is handed anyway inside ``no_sync()`` (:func:`without_ddp_reduction`).
Under FSDP2 the hooks already receive the reduce-scattered shard gradient: nothing to do.

An optimizer that changes which parameters train between steps (block-coordinate descent) is kept out
of DDP's wrapper the same way, since DDP's reducer only knows the parameters that required gradients when
it wrapped the model; the trainer averages the gradients with :func:`average_gradients` instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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


def average_gradients(params: Iterable[torch.nn.Parameter], engine: Engine) -> None:
    """Average every existing ``.grad`` across the DDP ranks in place, one collective per dtype and device.

    For optimizers that change which parameters train (``Capabilities.changes_trainable``): the model is
    not DDP-wrapped, so this replaces DDP's reducer, after the last micro-batch. Divides before summing,
    as DDP does, elementwise: the same bits as DDP's buckets.
    """
    if engine.kind != "ddp" or engine.world_size < 2:
        return
    import torch.distributed as dist

    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat.div_(engine.world_size)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def replicate_without_ddp(accelerator: Any) -> None:
    """Make ``accelerator.prepare`` keep a model out of DDP's wrapper, with rank 0's weights everywhere."""
    prepare_model = accelerator.prepare_model

    def prepare_model_without_ddp(model, device_placement=None, evaluation_mode=False):
        # accelerate's evaluation mode places the model on its device and skips only the wrapping
        prepared = prepare_model(model, device_placement=device_placement, evaluation_mode=True)
        if not evaluation_mode:
            broadcast_from_rank0(prepared)
        return prepared

    accelerator.prepare_model = prepare_model_without_ddp


@torch.no_grad()
def broadcast_from_rank0(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a model)."""
    import torch.distributed as dist

    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


@contextlib.contextmanager
def without_ddp_reduction(model: torch.nn.Module) -> Iterator[None]:
    """Turn DDP's own gradient reduction off for one forward/backward (no-op for any other model)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield
