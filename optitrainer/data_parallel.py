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

import collections
import contextlib
import math
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


#: DDP's default bucket size (``bucket_cap_mb=25``); ``TrainingArguments.ddp_bucket_cap_mb`` overrides it
DEFAULT_BUCKET_CAP_MB = 25.0


class BucketedAverager:
    """Averages gradients across the DDP ranks in buckets, asynchronously, while backward goes on.

    What DDP's reducer does for a wrapped model, for engines that consume each gradient in its own hook
    (the layerwise engine, LOMO): :meth:`add` puts a gradient into the open bucket; once the bucket holds
    ``bucket_cap_mb``, it is copied into one flat buffer, divided by the world size and all-reduced
    without waiting (``async_op=True``). Each :meth:`add` hands the averages of the buckets that have
    arrived to their ``on_ready`` callbacks, in the order the gradients were added; with more than
    ``max_in_flight`` buckets in flight it waits for the oldest, which bounds the memory to about
    ``(max_in_flight + 1) * bucket_cap_mb``. :meth:`flush` sends the last, partial bucket and delivers
    everything: call it when backward returns.

    Every rank adds the same gradients in the same order (the same graph), so the buckets, and the
    collectives, match across ranks. Dividing before summing, elementwise, as DDP does: on two ranks the
    averages are bit for bit those of one all-reduce per gradient.
    """

    def __init__(
        self,
        world_size: int,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        max_in_flight: int = 2,
        group: Any = None,
    ) -> None:
        self.world_size = world_size
        self.bucket_cap_bytes = int(bucket_cap_mb * 1024 * 1024)
        self.max_in_flight = max(1, max_in_flight)
        self.group = group
        self._open: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = []
        self._open_bytes = 0
        self._in_flight: collections.deque[tuple[Any, torch.Tensor, list]] = collections.deque()
        #: the most bytes held in bucket buffers (open and in flight) at once since :meth:`reset_peak`
        self.peak_bytes = 0
        self._held_bytes = 0
        self.collectives = 0

    def add(self, grad: torch.Tensor, on_ready: Callable[[torch.Tensor], None]) -> None:
        """Average ``grad`` (the caller no longer needs it) and call ``on_ready(average)`` once it arrives.

        ``average`` has ``grad``'s shape and dtype; it may be a view into a bucket that is reused after
        the call returns, so ``on_ready`` must not keep it (copy what it keeps).
        """
        if self._open and (grad.dtype, grad.device) != (self._open[0][0].dtype, self._open[0][0].device):
            self._send()  # one dtype and device per flat buffer
        self._open.append((grad, on_ready))
        self._open_bytes += grad.numel() * grad.element_size()
        self._held_bytes += grad.numel() * grad.element_size()
        self.peak_bytes = max(self.peak_bytes, self._held_bytes)
        if self._open_bytes >= self.bucket_cap_bytes:
            self._send()
        self._deliver(wait=False)

    def flush(self) -> None:
        """Send the open bucket and deliver every average (the end of a backward pass)."""
        self._send()
        self._deliver(wait=True)

    def reset_peak(self) -> None:
        self.peak_bytes = self._held_bytes

    def _send(self) -> None:
        if not self._open:
            return
        import torch.distributed as dist

        entries, self._open, self._open_bytes = self._open, [], 0
        if len(entries) == 1:
            flat = entries[0][0].view(-1)  # one gradient: reduced in place, as DDP does with a big one
        else:
            flat = torch.cat([g.reshape(-1) for g, _ in entries])
            self._held_bytes += flat.numel() * flat.element_size()
            self.peak_bytes = max(self.peak_bytes, self._held_bytes)
            for g, _ in entries:  # the flat copy holds them now
                self._held_bytes -= g.numel() * g.element_size()
        layout = []
        offset = 0
        for g, on_ready in entries:
            layout.append((offset, g.shape, on_ready))
            offset += g.numel()
        del entries
        flat.div_(self.world_size)
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self.collectives += 1
        self._in_flight.append((work, flat, layout))
        while len(self._in_flight) > self.max_in_flight:
            self._deliver_oldest()

    def _deliver(self, wait: bool) -> None:
        while self._in_flight and (wait or self._in_flight[0][0].is_completed()):
            self._deliver_oldest()

    def _deliver_oldest(self) -> None:
        work, flat, layout = self._in_flight.popleft()
        work.wait()
        for offset, shape, on_ready in layout:
            numel = math.prod(shape)
            on_ready(flat[offset : offset + numel].view(shape))
        self._held_bytes -= flat.numel() * flat.element_size()


def bucketed_averager(engine: Engine, bucket_cap_mb: float | None = None) -> BucketedAverager | None:
    """A :class:`BucketedAverager` for ``engine`` under DDP with several ranks, else ``None``."""
    if engine.kind != "ddp" or engine.world_size < 2:
        return None
    return BucketedAverager(
        engine.world_size, DEFAULT_BUCKET_CAP_MB if bucket_cap_mb is None else bucket_cap_mb
    )


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
