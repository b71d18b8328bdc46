"""``lomo``/``adalomo`` under DDP: two CPU ranks (torchrun, gloo), one launch for every case.

Each hook averages its gradient across the ranks before the norm pass measures it and before the
update uses it (``BackwardContext.average_gradient``), so the ranks stay bit-identical and equal one
process that trains on the global batch, up to the reordering of float sums.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import torchrun  # the repository's launcher (tests/ is on pytest's pythonpath)
from optitrainer_lomo.optim import AdaLomo, Lomo

from optitrainer.testing import max_param_diff, run_training, tiny_llama

SCRIPT = Path(__file__).with_name("dist_lomo.py")
LR = {"lomo": 0.3, "adalomo": 0.1}
STEPS, PER_RANK, RANKS = 4, 2, 2
CASES = [(optim, clip) for optim in ("lomo", "adalomo") for clip in (0.0, 1.0)]
RESUMED = ("adalomo", 1.0)  # also resumed: 4 straight == 2 + checkpoint + fresh trainer + 2
#: one process with the global batch vs the ranks: the same numbers summed in another order
PARAM_ATOL, LOSS_ATOL, NORM_RTOL = 1e-5, 1e-5, 1e-5


def case_name(optim: str, clip: float) -> str:
    return f"{optim}-clip{clip:g}"


def train_args(optim: str, clip: float) -> dict:
    return {"learning_rate": LR[optim], "lr_scheduler_type": "linear", "max_grad_norm": clip}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Every case in one torchrun launch; ``{case: (rank0, rank1)}``."""
    out = tmp_path_factory.mktemp("ddp")
    runs = [
        {
            "name": case_name(optim, clip),
            "optim": optim,
            "steps": STEPS,
            "args": {"per_device_train_batch_size": PER_RANK, **train_args(optim, clip)},
            **({"resume_at": STEPS // 2} if (optim, clip) == RESUMED else {}),
        }
        for optim, clip in CASES
    ]
    (out / "runs.json").write_text(json.dumps(runs))
    torchrun(SCRIPT, out, out / "runs.json", nproc=RANKS, timeout=300)
    return {
        (optim, clip): tuple(
            torch.load(out / f"{case_name(optim, clip)}.rank{r}.pt", weights_only=True) for r in range(RANKS)
        )
        for optim, clip in CASES
    }


@pytest.mark.parametrize("optim,clip", CASES, ids=[case_name(*c) for c in CASES])
def test_ranks_train_on_different_data_and_stay_bit_identical(ddp, optim, clip):
    r0, r1 = ddp[optim, clip]
    assert r0["engine"] == r1["engine"] == "DDP"
    assert len(r0["batches"]) == STEPS and all(len(b) == PER_RANK for b in r0["batches"])
    assert all(a != b for a, b in zip(r0["batches"], r1["batches"]))  # so averaging is not a no-op
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), f"{name} differs between ranks"
    initial = dict(tiny_llama(seed=0).named_parameters())
    assert all(not torch.equal(p, initial[n].detach()) for n, p in r0["params"].items())  # all trained
    assert r0["grad_norms"] == r1["grad_norms"]
    if clip:  # the global norm of the averaged gradient, the same on every rank
        assert all(g is not None and g > 0 for g in r0["grad_norms"])
    else:
        assert r0["grad_norms"] == [None] * STEPS


@pytest.mark.parametrize("optim,clip", CASES, ids=[case_name(*c) for c in CASES])
def test_equals_one_process_with_the_global_batch(ddp, optim, clip, tmp_path):
    r0, r1 = ddp[optim, clip]
    model, seen = tiny_llama(seed=0), []
    model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].tolist()), with_kwargs=True)
    one = run_training(
        optim,
        tmp_path,
        steps=STEPS,
        model=model,
        per_device_train_batch_size=PER_RANK * RANKS,
        **train_args(optim, clip),
    )
    # the same global batch at every step: rank 0's rows then rank 1's
    assert seen == [a + b for a, b in zip(r0["batches"], r1["batches"])]
    diff = max_param_diff(one.params, r0["params"])
    print(f"\n{case_name(optim, clip)}: max |dparam| vs one process = {diff:.3g}", end="")
    assert diff <= PARAM_ATOL
    assert one.losses == pytest.approx(r0["losses"], rel=0, abs=LOSS_ATOL)
    if clip:
        norm_diff = max(abs(a - b) for a, b in zip(one.grad_norms, r0["grad_norms"]))
        print(f", max |dgrad_norm| = {norm_diff:.3g}", end="")
        assert one.grad_norms == pytest.approx(r0["grad_norms"], rel=NORM_RTOL)
    else:
        assert one.grad_norms == [None] * STEPS


def test_adalomo_resumes_exactly_under_ddp(ddp):
    for r in ddp[RESUMED]:
        assert max_param_diff(r["params"], r["resumed_params"]) == 0.0
        assert r["losses"] == r["resumed_losses"] and r["grad_norms"] == r["resumed_grad_norms"]
        assert len(r["resumed_batches"]) == STEPS // 2  # the resumed trainer ran only steps 3 and 4


def detached(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


# -- the averaging hook, in one process ---------------------------------------------------------------
@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_each_gradient_is_averaged_once_per_pass_before_it_is_measured_or_used(cls):
    """A stand-in 'average' that halves every gradient: the norm and the update must see the half."""
    batch = {"input_ids": torch.arange(16).reshape(1, 16) % 97}
    batch["labels"] = batch["input_ids"]
    plain, halved = tiny_llama(), tiny_llama()
    n_params = len(list(plain.parameters()))
    calls = []

    def average(grad):
        calls.append(grad.dtype)
        grad.mul_(0.5)

    ref, ours = cls(list(plain.parameters()), lr=0.0), cls(list(halved.parameters()), lr=0.0)
    ref_norm = ref.fused_backward(plain(**batch).loss * 0.5, 0.05, max_grad_norm=1e9)
    norm = ours.fused_backward(halved(**batch).loss, 0.05, max_grad_norm=1e9, average_gradient=average)
    assert calls == [torch.float32] * (2 * n_params)  # each tensor, in the norm pass and the update pass
    assert norm == ref_norm  # a power of two: exact
    assert max_param_diff(detached(plain), detached(halved)) == 0.0
    ours.fused_backward(halved(**batch).loss, 0.05)  # not kept after the call
    assert len(calls) == 2 * n_params
