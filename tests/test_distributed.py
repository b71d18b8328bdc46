"""DDP through torchrun (2 CPU ranks, gloo): every rank trains the same weights, equal to one process
with the same global batch (up to float reordering), layerwise forms included, and resume from a checkpoint is exact.

One launch trains every case (each launch costs ~10 s of startup); the one-process references run here.
CI runs the cases below; ``OPTITRAINER_DIST_SWEEP=1`` (``make test-distributed-sweep``) adds every other
registered name and layerwise form that claims DDP.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from launch import torchrun

from optitrainer.compat import supported_engines
from optitrainer.registry import REGISTRY
from optitrainer.testing import (
    GUIDE_TARGET_MODULES,
    conformance_cases,
    max_param_diff,
    run_training,
    tiny_llama,
)

#: float reordering (two half-batch gradients averaged vs one batch), 4 steps: measured ≤ 1.3e-6, muon 5.1e-5
TOL = 1e-4
DDP = {"ddp_backend": "gloo", "per_device_train_batch_size": 2, "warmup_steps": 1}
TARGETS = {"optim_target_modules": GUIDE_TARGET_MODULES}

CASES = {
    # the standard form of every seed optimizer that runs on CPU (DDP: whole parameters, averaged gradient)
    "adamw_torch": ("adamw_torch", {}),
    "sgd": ("sgd", {"optim_args": "momentum=0.9"}),
    "adafactor": ("adafactor", {}),
    "muon": ("muon", {}),
    "galore_adamw": ("galore_adamw", {**TARGETS, "optim_args": "rank=4, update_proj_gap=2"}),
    "apollo_adamw": ("apollo_adamw", {**TARGETS, "optim_args": "rank=4, update_proj_gap=2"}),
    "schedule_free_adamw": ("schedule_free_adamw", {"lr_scheduler_type": "constant"}),
    "stable_adamw": ("stable_adamw", {}),
    "grokadamw": ("grokadamw", {}),
    # the trainable block changes every 2 steps: the trainer averages gradients itself (no DDP wrapper)
    "badam": ("badam", {"optim_args": "switch_block_every=2"}),
    # layerwise: each hook averages its gradient across ranks before the per-parameter step
    "adamw_torch_layerwise": ("adamw_torch_layerwise", {"max_grad_norm": 0.0}),
    "adamw_torch_layerwise_clip": ("adamw_torch_layerwise", {"max_grad_norm": 1.0}),
    # the gradients averaged once and held until the norm is known (no rebuild, no second all-reduce)
    "adamw_torch_layerwise_clip_hold": (
        "adamw_torch_layerwise",
        {"max_grad_norm": 1.0, "layerwise_clipping": "hold"},
    ),
    "adamw_torch_clip": ("adamw_torch", {"max_grad_norm": 1.0}),
    "galore_adamw_layerwise": (
        "galore_adamw_layerwise",
        {**TARGETS, "max_grad_norm": 0.0, "optim_args": "rank=4, update_proj_gap=2"},
    ),
    "apollo_adamw_layerwise_clip": (
        "apollo_adamw_layerwise",
        {**TARGETS, "max_grad_norm": 1.0, "optim_args": "rank=4, update_proj_gap=2"},
    ),
    # accumulation with exact clipping: the last micro-batch's hooks average and measure, then the updates
    "adamw_torch_layerwise_accum_clip": (
        "adamw_torch_layerwise",
        {"max_grad_norm": 1.0, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 1},
    ),
    # accumulation: the hooks communicate and step on the last micro-batch only
    "sgd_layerwise_accum": (
        "sgd_layerwise",
        {
            "max_grad_norm": 0.0,
            "optim_args": "momentum=0.9",
            "gradient_accumulation_steps": 2,
            "per_device_train_batch_size": 1,
        },
    ),
}

if not hasattr(torch.optim, "Muon"):  # torch < 2.9: muon is refused (test_builtins shows how)
    del CASES["muon"]

if os.environ.get("OPTITRAINER_DIST_SWEEP") == "1":
    for _case in conformance_cases():
        if _case.skip is None and _case.optim not in CASES:
            if "ddp" in supported_engines(REGISTRY.resolve(_case.optim, check_installed=False)):
                CASES[_case.optim] = (_case.optim, dict(_case.args))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    runs = [{"name": k, "optim": o, "args": {**DDP, **a}, "steps": 4} for k, (o, a) in CASES.items()]
    # every case again: 2 steps, checkpoint, a fresh trainer resumes to step 4
    runs += [{**run, "name": run["name"] + "_resumed", "resume_at": 2} for run in runs]
    (out / "runs.json").write_text(json.dumps(runs))
    torchrun(
        Path(__file__).with_name("dist_train.py"), out, out / "runs.json", timeout=max(420, 12 * len(runs))
    )

    def load(name: str) -> tuple[dict, dict]:
        ranks = [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in (0, 1)]
        for r in ranks:
            assert r["refused"] is None, r["refused"]
            assert r["engine"] == "DDP"
        return ranks[0], ranks[1]

    return load


def one_process(optim: str, args: dict, tmp_path) -> object:
    """The same global batch (2 ranks x 2 sequences, or 2 ranks x 1 x 2 micro-batches) on one process."""
    args = {k: v for k, v in args.items() if k != "ddp_backend"}
    args["per_device_train_batch_size"] = 2 * args.pop("per_device_train_batch_size", 2)
    return run_training(optim, tmp_path, steps=4, **args)


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_ranks_identical_and_equal_to_one_process(case, ddp_results, tmp_path):
    r0, r1 = ddp_results(case)
    assert max_param_diff(r0["params"], r1["params"]) == 0.0, f"{case}: ranks differ"
    optim, args = CASES[case]
    # layerwise and fused-backward forms average in their hooks, and an optimizer that changes which
    # parameters train gets its gradients averaged by the trainer: no DDP wrapper (nor its buckets)
    resolved = REGISTRY.resolve(optim)
    caps = resolved.spec.capabilities
    unwrapped = resolved.layerwise or caps.owns_backward or caps.changes_trainable
    assert (r0["wrapper"] == "DistributedDataParallel") != unwrapped, r0["wrapper"]
    ref = one_process(optim, {**DDP, **args}, tmp_path)
    initial = dict(tiny_llama(seed=0).named_parameters())

    def moved(params):
        return sum(not torch.equal(p, initial[n].detach()) for n, p in params.items())

    # the same parameters trained (schedule-free RAdam stays still for its first steps, by design)
    assert moved(r0["params"]) == moved(ref.params), f"{case}: not the same parameters trained"
    diff = max_param_diff(r0["params"], ref.params)
    print(f"{case}: max |dparam| DDP(2) vs one process = {diff:.3g}")
    assert diff <= TOL, f"{case}: DDP drifts {diff:g} from one process with the same global batch"
    assert max(abs(a - b) for a, b in zip(r0["losses"], ref.losses)) <= TOL
    if args.get("max_grad_norm", 1.0) > 0:  # the logged norm is the global one, as on one process
        assert r0["grad_norms"] == r1["grad_norms"]
        for g, g_ref in zip(r0["grad_norms"], ref.grad_norms):
            assert g == pytest.approx(g_ref, rel=1e-5)


@pytest.mark.parametrize(
    "layerwise,standard",
    [
        ("adamw_torch_layerwise_clip", "adamw_torch_clip"),
        ("adamw_torch_layerwise_clip_hold", "adamw_torch_clip"),
    ],
)
def test_ddp_layerwise_equals_standard_under_ddp(layerwise, standard, ddp_results):
    lw, _ = ddp_results(layerwise)
    std, _ = ddp_results(standard)
    assert max_param_diff(lw["params"], std["params"]) <= 1e-6
    assert lw["grad_norms"] == pytest.approx(std["grad_norms"], rel=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_resume_is_exact(case, ddp_results):
    resumed, resumed1 = ddp_results(case + "_resumed")
    straight, _ = ddp_results(case)
    assert max_param_diff(resumed["params"], resumed1["params"]) == 0.0
    assert resumed["losses"][-2:] == straight["losses"][-2:]
    assert max_param_diff(resumed["params"], straight["params"]) == 0.0
