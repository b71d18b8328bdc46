"""Per-bucket timeline of gradient averaging under DDP: DDP's reducer against the layerwise engine's buckets.

    torchrun --nproc_per_node 2 tools/ddp_timeline.py [--timeline]    # 2 gloo ranks
    torchrun --nproc_per_node 1 tools/ddp_timeline.py                 # one process, same loops

Plain training loops (no Trainer, no threads), contenders alternating step by step in each rank:

* ``adamw_ddp``: the model DDP-wrapped, ``adamw_torch`` as the trainer builds it, stepped after backward;
* ``layerwise``: ``adamw_torch_layerwise`` as the trainer builds it, averaging in
  :class:`~optitrainer.data_parallel.BucketedAverager` buckets.

Printed: each contender's median step time on rank 0 and its ratio to ``adamw_ddp``. With ``--timeline``,
for one late step: each bucket's size, when it was sent and when it arrived (ms after backward began;
DDP's buckets through a comm hook doing what its built-in one does), when backward returned and when the
step ended. The hook's Python callbacks slow DDP down: compare step times from runs without it.

PyTorch's own optimizer-in-backward under DDP (``_apply_optimizer_in_backward``) would be the natural third
contender, but in torch 2.13 DDP's hook for it creates a ``torch.Stream`` and fails without an accelerator.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.distributed as dist


def _now_ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


class Timeline:
    """The collectives of one backward pass: size, sent and arrived, in ms after backward began."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.events: list[list] = []  # [size, sent ms, arrived ms]

    def begin(self) -> None:
        self.t0 = time.perf_counter()
        self.events = []

    def record_collective(self, work_future: torch.futures.Future, nbytes: int) -> torch.futures.Future:
        # a future that has already completed runs the callback at once: "arrived" is then "known by"
        entry = [f"{nbytes / 2**20:6.2f} MiB", _now_ms(self.t0), float("nan")]
        self.events.append(entry)

        def arrived(fut):
            entry[2] = _now_ms(self.t0)
            return fut.value()

        return work_future.then(arrived)


def ddp_hook(timeline: Timeline):
    def hook(state, bucket):
        buf = bucket.buffer()
        buf.div_(dist.get_world_size())
        fut = dist.all_reduce(buf, async_op=True).get_future()
        return timeline.record_collective(fut, buf.numel() * buf.element_size()).then(lambda f: f.value()[0])

    return hook


def instrumented_averager(world: int, timeline: Timeline):
    from optitrainer.data_parallel import BucketedAverager

    class Recording(BucketedAverager):
        def _all_reduce(self, flat, layout, buffer):
            super()._all_reduce(flat, layout, buffer)
            # the work just appended (it may have been delivered already if it was the oldest)
            for work, f, _, _ in self._in_flight:
                if f is flat:
                    timeline.record_collective(work.get_future(), flat.numel() * flat.element_size())

    return Recording(world)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--contenders", default="adamw_ddp,layerwise")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--model", default="8x512", help="a preset of optitrainer.bench.models")
    ap.add_argument(
        "--timeline",
        action="store_true",
        help="record when each bucket is sent and arrives (a Python comm hook: DDP's step gets slower)",
    )
    ns = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dist.init_process_group("gloo")
    # accelerate sets 2 threads when building TrainingArguments unless this is set
    os.environ["OMP_NUM_THREADS"] = str(ns.threads)
    torch.set_num_threads(ns.threads)

    from optitrainer.bench.models import build_model, vocab_size
    from optitrainer.data_parallel import BucketedAverager
    from optitrainer.layerwise import build_layerwise
    from optitrainer.plugin import BuildContext
    from optitrainer.registry import REGISTRY
    from optitrainer.testing import training_arguments

    base = build_model(ns.model, seed=0)
    g = torch.Generator().manual_seed(rank)
    batches = [
        torch.randint(0, vocab_size(base), (ns.batch_size, ns.seq_len), generator=g) for _ in range(ns.steps)
    ]

    contenders = {}
    for name in ns.contenders.split(","):
        model = copy.deepcopy(base)
        timeline = Timeline()
        if name == "adamw_ddp":
            wrapped = model
            if world > 1:
                wrapped = torch.nn.parallel.DistributedDataParallel(model)
                if ns.timeline:
                    wrapped.register_comm_hook(None, ddp_hook(timeline))
            resolved = REGISTRY.resolve("adamw_torch")  # as the trainer builds it (on CPU: not for-each)
            args = training_arguments("unused", learning_rate=1e-4, max_grad_norm=0.0)
            opt = resolved.spec.factory(BuildContext(model=model, args=args, options={}, name=resolved.name))

            def step(ids, wrapped=wrapped, opt=opt, timeline=timeline):
                loss = wrapped(input_ids=ids, labels=ids).loss
                timeline.begin()
                loss.backward()
                backward_end = _now_ms(timeline.t0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return backward_end, _now_ms(timeline.t0)

        elif name == "layerwise":
            resolved = REGISTRY.resolve("adamw_torch_layerwise")
            args = training_arguments("unused", learning_rate=1e-4, max_grad_norm=0.0)
            ctx = BuildContext(model=model, args=args, options={}, name=resolved.spec.name, layerwise=True)
            averager = None
            if world > 1:
                averager = instrumented_averager(world, timeline) if ns.timeline else BucketedAverager(world)
            engine = build_layerwise(resolved.spec, ctx, max_grad_norm=0.0, averager=averager)
            engine.attach()

            def step(ids, model=model, engine=engine, timeline=timeline):
                loss = model(input_ids=ids, labels=ids).loss
                timeline.begin()
                engine.backward(loss)
                t = _now_ms(timeline.t0)
                return t, t

        else:
            raise SystemExit(f"unknown contender {name}")
        contenders[name] = (step, timeline, [])

    for i, ids in enumerate(batches):
        for name, (step, timeline, times) in contenders.items():
            dist.barrier()
            t0 = time.perf_counter()
            backward_end, step_end = step(ids)
            times.append(time.perf_counter() - t0)
            if i == len(batches) - 2 and rank == 0:
                print(
                    f"--- {name} step {i}: backward returned {backward_end:.1f} ms, step ended {step_end:.1f} ms"
                )
                for what, sent, arrived in timeline.events:
                    print(
                        f"    {what} sent {sent:7.1f} arrived {arrived:7.1f} ({arrived - sent:6.1f} in flight)"
                    )
    if rank == 0:
        base_t = None
        for name, (_, _, times) in contenders.items():
            med = statistics.median(times[2:]) * 1e3
            base_t = base_t or med
            print(f"{name:>18}: {med:7.1f} ms  ratio {med / base_t:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
