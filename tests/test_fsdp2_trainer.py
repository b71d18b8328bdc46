"""OptiTrainer through the Trainer's own FSDP2 path (``fsdp=True``, ``fsdp_config={"version": 2}``): CPU, gloo.

Three launches of ``fsdp2_trainer.py`` (see its docstring): a one-process reference without FSDP on the
same global batch of 4, then 2 ranks under torchrun that train every case for 4 steps with a checkpoint
after step 2 (``per_device_train_batch_size=2``), then fresh ranks that resume that checkpoint. The ranks
run accelerate's FSDP2 preparation (``fully_shard`` of every decoder layer, the embeddings, the tail and
the root), accelerate's clipping, and the Trainer's FSDP checkpointing; the layerwise engine steps each
shard from its post-accumulate-grad hook and checkpoints through DCP.

accelerate selects FSDP only on GPU-like devices; the launched script applies one test-only shim,
``let_accelerate_run_fsdp_on_cpu`` (documented there), and ``test_stock_accelerate_drops_fsdp_on_cpu``
records why it is needed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from launch import run_launcher, torchrun

SCRIPT = Path(__file__).with_name("fsdp2_trainer.py")
_spec = importlib.util.spec_from_file_location("fsdp2_trainer", SCRIPT)
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


def _unavailable() -> str | None:
    problem = S.fsdp_available_on_cpu()
    if problem is not None:
        return problem
    import accelerate
    from packaging.version import Version

    if Version(accelerate.__version__) < Version("1.6"):
        return f"accelerate {accelerate.__version__} has no FSDP2 (fsdp_version=2 needs accelerate >= 1.6)"
    return None


_UNAVAILABLE = _unavailable()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))

#: Adam divides by sqrt(v): the float reordering of a 2-rank reduce-scatter (vs one process summing the
#: whole batch) moves the weights by up to ~1e-3 of a step (lr 1e-2 here). Measured: 1.6e-5.
ATOL = 1e-4
#: the one-process and 2-rank losses and global grad norms: float noise only (measured: 2e-7 relative)
RTOL_LOGGED = 1e-5
CASES = list(S.CASES)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The reference (one process) and the 2-rank training launch: one at a time (2 cores)."""
    out = tmp_path_factory.mktemp("fsdp2_trainer")
    run_launcher([sys.executable, str(SCRIPT), str(out), "reference"], timeout=240)
    torchrun(SCRIPT, out, "train", timeout=300)
    return out


def _root_cause(out: Path, case: str, mode: str) -> str:
    errors = sorted(out.glob(f"{case}.{mode}.error.rank*.txt"))
    return "\n".join(f"{e.name}:\n{e.read_text()[-3000:]}" for e in errors)


@pytest.fixture(scope="module")
def resumed(out):
    """Fresh ranks resume every case from checkpoint-SAVE_AT (a model from another seed), in CASES order.

    Not checked here: a case that fails stops the launch, the cases before it still have their results.
    """
    proc = torchrun(SCRIPT, out, "resume", timeout=300, check=False)
    return out, proc


def test_stock_accelerate_drops_fsdp_on_cpu(out):
    # why the shim exists: with fsdp=True, use_cpu=True under torchrun, stock accelerate (state.py) keeps
    # MULTI_CPU and drops the plugin the Trainer built from fsdp_config, so the Trainer runs DDP
    for rank in (0, 1):
        found = json.loads((out / f"stock_accelerate.rank{rank}.json").read_text())
        assert found["fsdp_plugin_args"]  # transformers did ask for FSDP
        if found["is_fsdp_enabled"]:
            pytest.fail(f"accelerate now selects FSDP on CPU by itself ({found}): the shim can go")
        assert found["distributed_type"] == "MULTI_CPU", found
        assert found["engine"] == "DDP", found
        # and OptiTrainer says so instead of training on silently
        said = [w for w in found["warnings"] if "asks for FSDP2, but accelerate runs DDP" in w]
        assert said and "not with use_cpu" in said[0], found["warnings"]


@pytest.mark.parametrize("case", CASES)
def test_trainer_shards_with_fsdp2(case, out):
    ranks = [_load(out / f"{case}.train.rank{r}.pt") for r in (0, 1)]
    for r in ranks:
        seen = {k: r[k] for k in ("fsdp", "distributed_type", "engine")}
        assert seen == {"fsdp": True, "distributed_type": "FSDP", "engine": "FSDP2"}, seen
        assert r["local_numel"] < r["numel"]  # each rank holds only its shard
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == ranks[0]["numel"]
    expected = "LayerwiseOptimizer" if S.CASES[case]["optim"].endswith("_layerwise") else "AdamW"
    assert ranks[0]["optimizer"] == expected


@pytest.mark.parametrize("case", CASES)
def test_ranks_identical_and_equal_to_one_process(case, out):
    r0, r1 = (_load(out / f"{case}.train.rank{r}.pt") for r in (0, 1))
    ref = _load(out / f"{case}.reference.pt")
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), f"{name} differs between ranks"
    assert not ref["fsdp"] and ref["steps"] == r0["steps"] == list(range(1, S.STEPS + 1))
    d = _max_diff(r0["params"], ref["params"])
    moved = _max_diff(ref["params"], _initial_params())
    print(f"{case}: max|dparam| 2-rank FSDP2 vs one process {d:.3g} (weights moved by up to {moved:.3g})")
    assert d <= ATOL
    assert r0["learning_rates"] == ref["learning_rates"]
    assert r0["losses"] == pytest.approx(ref["losses"], rel=RTOL_LOGGED)
    if S.CASES[case]["max_grad_norm"] > 0:
        # the global norm over both ranks' shards, logged as one process logs it, and the clip is active
        assert r0["grad_norms"] == r1["grad_norms"]
        assert r0["grad_norms"] == pytest.approx(ref["grad_norms"], rel=RTOL_LOGGED)
        assert min(ref["grad_norms"]) > S.CASES[case]["max_grad_norm"]


def test_layerwise_engine_matches_the_standard_optimizer_under_fsdp2(out):
    layerwise = _load(out / "layerwise_clip.train.rank0.pt")
    standard = _load(out / "adamw.train.rank0.pt")
    assert S.CASES["layerwise_clip"]["max_grad_norm"] == S.CASES["adamw"]["max_grad_norm"]
    d = _max_diff(layerwise["params"], standard["params"])
    print(f"layerwise_clip vs adamw_torch, both FSDP2: max|dparam| {d:.3g}")
    assert d <= ATOL


@pytest.mark.parametrize("case", CASES)
def test_resume_continues_the_uninterrupted_trajectory(case, resumed):
    out, proc = resumed
    results = [out / f"{case}.resume.rank{rank}.pt" for rank in (0, 1)]
    if not all(r.is_file() for r in results):
        cause = (
            _root_cause(out, case, "resume") or "(no traceback recorded: an earlier case stopped the launch)"
        )
        pytest.fail(
            f"resuming {case} failed (launch exit {proc.returncode}):\n{cause}\n{proc.output[-2000:]}"
        )
    for rank in (0, 1):
        whole = _load(out / f"{case}.train.rank{rank}.pt")
        again = _load(results[rank])
        d = _max_diff(again["params"], whole["params"])
        print(f"{case} rank {rank}: max|dparam| resumed vs uninterrupted {d:.3g}", end="; ")
        assert d == 0.0
        # the steps after the checkpoint were trained again (the ones before come from trainer_state.json)
        after = [i for i, s in enumerate(whole["steps"]) if s > S.SAVE_AT]
        assert [again["steps"][i] for i in after] == [whole["steps"][i] for i in after]
        for key in ("losses", "grad_norms", "learning_rates"):
            assert [again[key][i] for i in after] == [whole[key][i] for i in after], key


def _initial_params() -> dict[str, torch.Tensor]:
    from optitrainer.testing import tiny_llama

    return {n: p.detach().clone() for n, p in tiny_llama(seed=0, **S.MODEL).named_parameters()}
