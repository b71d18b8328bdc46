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
import time
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
    (the layerwise engine, LOMO): :meth:`add` divides a gradient by the world size straight into the open
    bucket (one pass over it, while it is still in cache; the caller frees it right after); once the
    next gradient would not fit in ``bucket_cap_mb``, the bucket is all-reduced without waiting
    (``async_op=True``). Each :meth:`add` hands the averages of the buckets that have arrived to their
    ``on_ready`` callbacks, in the order the gradients were added; with more than ``max_in_flight``
    buckets in flight it waits for the oldest. A gradient larger than a bucket is reduced in place, alone.
    Bucket buffers are reused from step to step, so memory stays at ``max_in_flight + 1`` buckets beyond
    the gradients themselves. :meth:`flush` sends the last bucket and delivers everything: call it when
    backward returns.

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
        self.bucket_cap_bytes = max(1, int(bucket_cap_mb * 1024 * 1024))
        self.max_in_flight = max(1, max_in_flight)
        self.group = group
        self._open: torch.Tensor | None = None  # the bucket being filled
        self._open_used = 0  # elements of it filled
        self._open_layout: list[tuple[int, torch.Size, Callable[[torch.Tensor], None]]] = []
        # (work, averaged flat tensor, layout, bucket buffer to reuse or None for a gradient reduced in place)
        self._in_flight: collections.deque[tuple[Any, torch.Tensor, list, torch.Tensor | None]] = (
            collections.deque()
        )
        self._free: list[torch.Tensor] = []  # bucket buffers to reuse
        #: collectives sent, and seconds spent waiting for one to arrive (communication not overlapped)
        self.collectives = 0
        self.wait_s = 0.0
        #: bytes of the bucket buffers, all kept for reuse (the gradients reduced in place not counted)
        self.buffer_bytes = 0
        self._remaining: int | None = None  # gradient bytes still to come in this pass (see expect)

    def add(self, grad: torch.Tensor, on_ready: Callable[[torch.Tensor], None]) -> None:
        """Average ``grad`` (the caller no longer needs it) and call ``on_ready(average)`` once it arrives.

        ``average`` has ``grad``'s shape and dtype; it may be a view into a bucket that is reused after
        the call returns, so ``on_ready`` must not keep it (copy what it keeps).
        """
        numel = grad.numel()
        if numel * grad.element_size() >= self.bucket_cap_bytes:
            self._send()  # the open bucket first: the order of the averages is the order of the adds
            if self._remaining is not None:
                self._remaining -= numel * grad.element_size()
            flat = grad.reshape(-1)
            flat.div_(self.world_size)
            self._all_reduce(flat, [(0, grad.shape, on_ready)], buffer=None)
        else:
            open_ = self._open
            if open_ is not None and (
                open_.dtype != grad.dtype
                or open_.device != grad.device
                or self._open_used + numel > open_.numel()
            ):
                self._send()
            if self._open is None:
                self._open = self._buffer(grad)
            offset = self._open_used
            torch.div(grad.reshape(-1), self.world_size, out=self._open[offset : offset + numel])
            self._open_used += numel
            self._open_layout.append((offset, grad.shape, on_ready))
            if self._remaining is not None:
                self._remaining -= numel * grad.element_size()
                if self._open_used * grad.element_size() >= self._remaining:
                    self._send()
        self._deliver(wait=False)

    def expect(self, nbytes: int) -> None:
        """Announce the gradient bytes this pass will add (optional): the last buckets then shrink.

        The bucket that holds the last gradient is sent only when backward returns, so its communication
        is never overlapped. Knowing what is still to come, a bucket is sent as soon as it holds at
        least as much: the tail halves bucket after bucket, down to the last gradients alone.
        """
        self._remaining = nbytes

    def flush(self) -> None:
        """Send the open bucket and deliver every average (the end of a backward pass)."""
        self._send()
        self._deliver(wait=True)
        self._remaining = None

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        for i, buf in enumerate(self._free):
            if buf.dtype == like.dtype and buf.device == like.device:
                return self._free.pop(i)
        buf = torch.empty(self.bucket_cap_bytes // like.element_size(), dtype=like.dtype, device=like.device)
        self.buffer_bytes += buf.numel() * buf.element_size()  # kept and reused, never freed
        return buf

    def _send(self) -> None:
        if self._open is None or not self._open_layout:
            return
        buf, used, layout = self._open, self._open_used, self._open_layout
        self._open, self._open_used, self._open_layout = None, 0, []
        self._all_reduce(buf[:used], layout, buffer=buf)

    def _all_reduce(self, flat: torch.Tensor, layout: list, buffer: torch.Tensor | None) -> None:
        import torch.distributed as dist

        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self.collectives += 1
        self._in_flight.append((work, flat, layout, buffer))
        while len(self._in_flight) > self.max_in_flight:
            self._deliver_oldest()

    def _deliver(self, wait: bool) -> None:
        while self._in_flight and (wait or self._in_flight[0][0].is_completed()):
            self._deliver_oldest()

    def _deliver_oldest(self) -> None:
        work, flat, layout, buffer = self._in_flight.popleft()
        t0 = time.perf_counter()
        work.wait()
        self.wait_s += time.perf_counter() - t0
        for offset, shape, on_ready in layout:
            on_ready(flat[offset : offset + math.prod(shape)].view(shape))
        if buffer is not None:
            self._free.append(buffer)


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
