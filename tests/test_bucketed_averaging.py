"""The bucketed, overlapped gradient averaging of the layerwise engine and LOMO under DDP (2 gloo ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bucket_worker import gradients
from launch import torchrun

WORKER = Path(__file__).with_name("bucket_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("buckets")
    torchrun(WORKER, out, nproc=2, timeout=120)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("cap", ["tiny", "ddp"])
def test_every_average_arrives_once_in_order_bit_identical_to_one_all_reduce_each(ranks, cap):
    n = len(gradients(0))
    for result in ranks:
        got = result[cap]
        assert got["order"] == list(range(n))
        for avg, ref in zip(got["averages"], result["reference"]):
            assert avg.dtype == ref.dtype and avg.shape == ref.shape
            assert torch.equal(avg, ref)  # dividing before summing, as DDP: the same bits on 2 ranks
    expected = [(g0 / 2 + g1 / 2) for g0, g1 in zip(gradients(0), gradients(1))]
    assert all(torch.equal(a, e) for a, e in zip(ranks[0][cap]["averages"], expected))


def test_buckets_bound_the_memory_and_the_collectives(ranks):
    tiny, ddp = ranks[0]["tiny"], ranks[0]["ddp"]
    # tiny buckets (20 kB): many collectives; the buffers are reused, at most 2 in flight + 1 being filled,
    # for each of the two dtypes (gradients larger than a bucket are reduced in place)
    assert tiny["collectives"] >= 5
    assert tiny["buffer_bytes"] <= 2 * 3 * 20_000
    # DDP's 25 MiB: one bucket per dtype (the bfloat16 gradient closes the float32 bucket before it)
    assert ddp["collectives"] == 3


@pytest.mark.parametrize("cap_mb, expected_bytes", [(None, 25 * 2**20), (5, 5 * 2**20)])
def test_the_trainer_sizes_its_buckets_from_ddp_bucket_cap_mb(tmp_path, cap_mb, expected_bytes):
    """`ddp_bucket_cap_mb` (DDP's own setting) sizes the layerwise engine's buckets; unset, DDP's 25 MiB."""
    from optitrainer import OptiTrainer
    from optitrainer.engine import Engine
    from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments

    args = training_arguments(tmp_path, optim="adamw_torch_layerwise", ddp_bucket_cap_mb=cap_mb)
    trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset())
    trainer.opti_engine = Engine("ddp", 2)  # what a 2-rank launch reads from the accelerator
    engine = trainer.create_optimizer()
    assert engine.averager is not None and engine.averager.bucket_cap_bytes == expected_bytes
