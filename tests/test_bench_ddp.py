"""`optitrainer bench --ddp N`: contenders stepping in turn inside each rank of one torchrun launch."""

from __future__ import annotations

import json
import threading

import pytest

from optitrainer.bench import main as bench_main
from optitrainer.bench.ddp import Turnstile, resolve_device


def test_the_turnstile_runs_contenders_round_robin_and_skips_finished_ones():
    turns, order = Turnstile(3), []
    steps = {0: 2, 1: 3, 2: 1}

    def contender(i):
        for _ in range(steps[i]):
            turns.wait(i)
            order.append(i)
            turns.pass_on(i)
        turns.wait(i)
        turns.finish(i)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    turns.start()
    for t in threads:
        t.join(timeout=10)
    assert order == [0, 1, 2, 0, 1, 1]


def test_ddp_mode_prints_both_launches_ratios_and_communication(tmp_path, capsys):
    argv = ["--ddp", "2", "--model", "tiny", "--steps", "4", "--warmup-steps", "1", "--batch-size", "2"]
    argv += [
        "--optim",
        "adamw_torch,sgd_layerwise,sgd_layerwise:1,sgd_layerwise:1:hold",
        "--out",
        str(tmp_path),
    ]
    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "ddp.json").read_text())
    labels = [r["label"] for r in summary["rows"]]
    assert labels == ["adamw_torch", "sgd_layerwise", "sgd_layerwise clip1", "sgd_layerwise clip1 hold"]
    assert [r["layerwise_clipping"] for r in summary["rows"]] == ["auto", "auto", "auto", "hold"]
    first = summary["rows"][0]
    assert first["ratio_1"] == first["ratio_2"] == 1.0
    # the one-process reference is a plain run: not DDP with one rank (what torchrun's single process got)
    assert first["wrapped_2"] == "DistributedDataParallel" and first["wrapped_1"] == "LlamaForCausalLM"
    assert all(r["wrapped_1"] == r["wrapped_2"] == "LlamaForCausalLM" for r in summary["rows"][1:])
    assert summary["device"] == "cpu" and "2 ranks (gloo on CPU) against one process" in out
    assert "added per step by 2 ranks, ms: adamw_torch " in out and "(DDP's reducer)" in out
    assert all(r["ms_1"] > 0 and r["ms_2"] > 0 for r in summary["rows"])
    assert set(summary["communication_s"]) == {"per_tensor", "flat", "bucketed"}
    assert "sgd_layerwise clip1 / sgd_layerwise:" in out and "communication alone, 2 ranks" in out
    assert "sgd_layerwise clip1 hold / sgd_layerwise:" in out
    # the layerwise forms average in buckets (memory bounded by the buckets); DDP's wrapper averages adamw's
    assert first["averaging"] is None
    for row in summary["rows"][1:]:
        a = row["averaging"]
        assert a["buffer_mib"] > 0 and a["collectives_per_step"] >= 1 and a["wait_ms_per_step"] >= 0
    assert "sgd_layerwise: bucketed averaging under DDP holds" in out


def test_ddp_mode_refuses_a_typo_before_launching(capsys):
    assert bench_main(["--ddp", "2", "--optim", "adamw_torhc"]) == 2
    assert "adamw_torhc" in capsys.readouterr().out


def test_ddp_mode_runs_on_gpus_only_with_one_gpu_per_rank():
    assert resolve_device("auto", 2, cuda_devices=2) == "cuda"
    assert resolve_device("auto", 2, cuda_devices=1) == "cpu"  # two ranks cannot share one GPU under NCCL
    assert resolve_device("cpu", 2, cuda_devices=8) == "cpu"
    assert resolve_device("cuda", 4, cuda_devices=4) == "cuda"
    with pytest.raises(ValueError, match="has 1 CUDA device.*machine with 2 GPUs, or pass --device cpu"):
        resolve_device("cuda", 2, cuda_devices=1)
    with pytest.raises(ValueError, match="each rank takes its own GPU"):
        resolve_device("cuda:1", 2, cuda_devices=2)


def test_ddp_mode_on_cuda_without_gpus_is_refused_before_launching(capsys):
    """This machine has no GPU: --device cuda says how many it has and what to run instead."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a machine with CUDA devices")
    assert bench_main(["--ddp", "2", "--device", "cuda"]) == 2
    out = capsys.readouterr().out
    assert "has 0 CUDA device(s)" in out and "--device cpu" in out


def test_ddp_mode_needs_two_ranks():
    with pytest.raises(SystemExit):
        bench_main(["--ddp", "1"])


def test_the_bucket_timeline_tool_runs_both_loops_and_prints_each_bucket():
    """tools/ddp_timeline.py: DDP's buckets and the layerwise engine's, sent and arrived, on 2 ranks."""
    from pathlib import Path

    from optitrainer.torchrun import run_torchrun

    tool = Path(__file__).resolve().parent.parent / "tools" / "ddp_timeline.py"
    code, out = run_torchrun([tool, "--model", "tiny", "--steps", "4", "--timeline"], 2, timeout=300)
    assert code == 0, out[-3000:]
    assert "--- adamw_ddp step 2:" in out and "--- layerwise step 2:" in out
    assert out.count(" sent ") >= 2 and "arrived" in out
    assert "adamw_ddp:" in out and "layerwise:" in out and "ratio" in out
