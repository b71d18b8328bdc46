"""``optitrainer bench``: its memory accounting on cases whose sizes are computed by hand, and the CLI."""

from __future__ import annotations

import csv
import functools
import json
import tempfile

import pytest
import torch

from optitrainer.bench import main as bench_main
from optitrainer.bench import memory
from optitrainer.bench.runner import RunConfig, tracked_phase
from optitrainer.testing import tiny_llama, tiny_llama_config

F32 = 4  # bytes per float32


def tiny_llama_sizes() -> tuple[int, int, int]:
    """(parameter count, parameter tensors, largest parameter's count) of the tiny Llama, by hand."""
    c = tiny_llama_config()
    h, inter, v = c.hidden_size, c.intermediate_size, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    layer = h * h + h * kv + h * kv + h * h  # q, k, v, o projections (no biases)
    layer += 3 * h * inter  # gate, up, down
    layer += 2 * h  # two RMSNorm weights
    count = v * h + c.num_hidden_layers * layer + h + v * h  # embeddings, layers, final norm, untied head
    tensors = 1 + 9 * c.num_hidden_layers + 1 + 1
    return count, tensors, v * h


N_PARAMS, N_TENSORS, LARGEST = tiny_llama_sizes()
PARAM_BYTES = N_PARAMS * F32
# AdamW keeps exp_avg and exp_avg_sq (each the size of the parameter) and a float32 step per tensor
ADAMW_STATE_BYTES = 2 * PARAM_BYTES + N_TENSORS * F32


def test_hand_computed_sizes_are_the_models():
    assert (N_PARAMS, N_TENSORS) == (24_800, 21)
    sizes = memory.model_sizes(tiny_llama())
    assert sizes.n_params == N_PARAMS and sizes.param_bytes == sizes.trainable_bytes == PARAM_BYTES
    assert sizes.largest_param_bytes == LARGEST * F32


def test_tracker_counts_live_storage_bytes_exactly():
    tracker = memory.LiveTensorTracker("cpu")
    with tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4000
        view = a.view(10, 100)  # same storage: no new bytes
        del a  # the view keeps the storage alive
        c = torch.empty(250)  # 1000: the peak, 9000
        del view, b
        d = torch.empty(100)  # 400
    assert tracker.peak == 9000
    assert tracker.current == 1400
    assert tracker.breakdown() == {
        "params": 0,
        "grads": 0,
        "optimizer_state": 0,
        "other": 9000,
        "total": 9000,
    }
    del c, d


def _tracked(optim: str, tmp_path, **overrides):
    cfg = RunConfig(optim=optim, trainer="optitrainer", trainer_optim=optim, **overrides)
    return tracked_phase(cfg, torch.device("cpu"), str(tmp_path), lambda event: None)


@functools.cache
def _tracked_short(optim: str) -> dict:
    """One 4-token sequence, 2 tracked steps; cached: several tests read the same layerwise runs."""
    with tempfile.TemporaryDirectory() as tmp:
        return _tracked(optim, tmp, batch_size=1, seq_len=4, mem_steps=2)


def test_adamw_breakdown_at_peak_equals_hand_computed_bytes(tmp_path):
    # one sequence of 4 tokens: activations are small, so the peak is inside the optimizer step,
    # where the weights, every gradient and the whole state are alive at once
    out = _tracked("adamw_torch", tmp_path, batch_size=1, seq_len=4, mem_steps=2)
    peak = out["breakdown_at_peak"]
    assert peak["params"] == PARAM_BYTES
    assert peak["grads"] == PARAM_BYTES
    assert peak["optimizer_state"] == ADAMW_STATE_BYTES
    assert peak["total"] == out["tracked_peak_bytes"] == sum(peak[r] for r in memory.ROLES)
    assert out["max_grad_bytes_alive"] == PARAM_BYTES
    assert out["state_bytes_end_tracked"] == ADAMW_STATE_BYTES
    assert out["untracked_role_bytes"] == 0


@pytest.mark.parametrize("optim, state", [("adamw_torch_layerwise", ADAMW_STATE_BYTES), ("sgd_layerwise", 0)])
def test_layerwise_keeps_at_most_the_largest_gradient_alive(optim, state):
    out = _tracked_short(optim)
    peak = out["breakdown_at_peak"]
    assert peak["params"] == PARAM_BYTES and peak["optimizer_state"] == state
    assert peak["grads"] <= LARGEST * F32
    assert out["max_grad_bytes_alive"] == LARGEST * F32  # at any moment, not only at the peak
    assert out["state_bytes_end_tracked"] == state  # found inside the per-parameter optimizers


def test_layerwise_adamw_step_holds_at_most_one_parameter_sized_temporary():
    # the same activations as SGD's (no state, no temporaries), so what AdamW adds beyond them at the
    # peak is its step's temporaries: the denominator, divided in place (torch's per-tensor form: two)
    sgd, adamw = _tracked_short("sgd_layerwise"), _tracked_short("adamw_torch_layerwise")
    extra = adamw["breakdown_at_peak"]["other"] - sgd["breakdown_at_peak"]["other"]
    assert 0 < extra <= LARGEST * F32


def test_floor_counts_the_gradients_each_method_needs():
    sizes = memory.model_sizes(tiny_llama())
    standard = memory.analytic_floor(sizes, ADAMW_STATE_BYTES, memory.GRADS_ALL)
    layerwise = memory.analytic_floor(sizes, ADAMW_STATE_BYTES, memory.GRADS_LARGEST)
    assert standard["total"] == PARAM_BYTES + PARAM_BYTES + ADAMW_STATE_BYTES
    assert layerwise["total"] == PARAM_BYTES + LARGEST * F32 + ADAMW_STATE_BYTES


def test_cli_writes_table_json_csv_and_png(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--optim", "adamw_torch,sgd_layerwise", "--steps", "2", "--warmup-steps", "1"]
    argv += ["--mem-steps", "1", "--threads", "1", "--out", str(out)]
    assert bench_main(argv) == 0, capsys.readouterr().out
    assert "peak/floor" in capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert [(r["optim"], r["trainer"], r["ok"]) for r in summary["runs"]] == [
        ("adamw_torch", "optitrainer", True),
        ("sgd_layerwise", "optitrainer", True),
    ]
    adamw, sgd = summary["runs"]
    assert adamw["memory"]["breakdown_at_peak"]["params"] == PARAM_BYTES
    assert adamw["floor"]["total"] == 2 * PARAM_BYTES + ADAMW_STATE_BYTES
    assert sgd["floor"]["total"] == PARAM_BYTES + LARGEST * F32
    assert len(adamw["losses"]) == 2 and adamw["timing"]["median_step_s"] > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["optim"] for r in rows] == ["adamw_torch", "sgd_layerwise"]
    assert "| sgd_layerwise | optitrainer |" in (out / "results.md").read_text()
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").stat().st_size > 10_000


def test_cli_refuses_an_unknown_name_before_running_anything(tmp_path, capsys):
    assert bench_main(["--optim", "adamw_torhc", "--out", str(tmp_path / "x")]) == 2
    assert "adamw_torch" in capsys.readouterr().out  # the closest name
    assert not (tmp_path / "x").exists()


def test_clip_cost_prints_the_clipped_over_unclipped_ratio(capsys):
    argv = ["--clip-cost", "--optim", "lomo", "--max-grad-norm", "0.5", "--steps", "3", "--warmup-steps", "1"]
    assert bench_main([*argv, "--batch-size", "2", "--seq-len", "8", "--lr", "5e-3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:4] == ["optimizer", "clipped", "ms", "unclipped"] for line in lines)
    row = next(line for line in lines if line.startswith("lomo "))
    name, clipped_ms, plain_ms, ratio, _pairwise, engaged = row.split()
    assert name == "lomo" and engaged == "True"  # the norm exceeded 0.5: the clipped run did clip
    # the medians are printed to 0.1 ms: the ratio lies within what that rounding allows
    c, u = float(clipped_ms), float(plain_ms)
    assert (c - 0.05) / (u + 0.05) - 1e-3 <= float(ratio) <= (c + 0.05) / (u - 0.05) + 1e-3


def test_clip_cost_refuses_what_it_does_not_measure(capsys):
    assert bench_main(["--clip-cost", "--optim", "lomo", "--dtype", "bfloat16"]) == 2
    assert "float32 on the CPU" in capsys.readouterr().out


def _run(optim: str, rss_delta: int, floor: int, trainer: str = "optitrainer") -> dict:
    return {
        "optim": optim,
        "trainer": trainer,
        "ok": True,
        "memory": {"rss_delta_bytes": rss_delta},
        "floor": {"total": floor},
    }


def test_rss_over_floor_subtracts_what_plain_sgd_holds_beyond_its_floor():
    from optitrainer.bench.report import calibrate_rss

    # sgd: 300 resident bytes beyond its weights and gradients (libraries, allocator slack)
    runs = [
        _run("sgd", 1300, 1000),
        _run("adalomo", 900, 500),
        _run("sgd", 1500, 1000, trainer="transformers"),
    ]
    runs.append(_run("lomo", 800, 500, trainer="transformers"))
    calibrate_rss(runs)
    assert runs[0]["rss_over_floor"] == 1.0
    assert runs[1]["rss_over_floor"] == (900 - 300) / 500
    assert runs[3]["rss_over_floor"] == (800 - 500) / 500  # each trainer calibrated by its own sgd run
    alone = [_run("adalomo", 900, 500)]
    calibrate_rss(alone)
    assert "rss_over_floor" not in alone[0]  # no sgd run: nothing to calibrate with
