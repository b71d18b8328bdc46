"""Worker for tests/test_bucketed_averaging.py: one rank of a 2-process gloo group.

``bucket_worker.py OUT``: averages the same list of gradients (different values on each rank) three
ways -- one blocking all-reduce per gradient (the reference), and the bucketed averager with a tiny and
with DDP's default bucket -- and writes what each delivered, in what order, and the bucket bytes held.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from optitrainer import release_gloo_workers_at_exit
from optitrainer.data_parallel import BucketedAverager

SHAPES = [(64, 32), (32,), (128, 64), (7,), (64, 64), (3, 5, 7), (256,), (32, 32)]


def gradients(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)
    grads = [torch.randn(shape, generator=gen) for shape in SHAPES]
    grads.append(torch.randn(16, generator=gen).to(torch.bfloat16))  # another dtype: its own bucket
    grads.append(torch.randn(48, 8, generator=gen))
    return grads


def main(out: str) -> None:
    dist.init_process_group("gloo")
    release_gloo_workers_at_exit()
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = []
    for g in gradients(rank):
        g = g.clone()
        g.div_(world)
        dist.all_reduce(g)
        reference.append(g)
    result = {"reference": reference}
    for label, cap_mb in (("tiny", 20_000 / 2**20), ("ddp", 25.0)):
        averager = BucketedAverager(world, bucket_cap_mb=cap_mb, max_in_flight=2)
        delivered: list[tuple[int, torch.Tensor]] = []
        for i, g in enumerate(gradients(rank)):
            averager.add(g, lambda avg, i=i, out=delivered: out.append((i, avg.clone())))
        averager.flush()
        result[label] = {
            "order": [i for i, _ in delivered],
            "averages": [a for _, a in delivered],
            "buffer_bytes": averager.buffer_bytes,
            "collectives": averager.collectives,
        }
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
