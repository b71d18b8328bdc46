"""Claimed capabilities, exercised: gradient accumulation and fp16 loss scaling."""

from __future__ import annotations

import functools
import math
from pathlib import Path

from .result import NotRunnable, Skip
from .rounding import NOISE_FACTOR, rounding_sensitivity

#: accumulation vs one bigger batch: the same sums in another order, relative to how far the weights
#: moved (measured over 3 steps: AdamW 2.4e-8 of 1.8e-3, SGD 1.9e-9 of 1e-4; Muon 3.9e-5 of 1.5e-3 = 2.6 %,
#: its Newton-Schulz iteration runs in bfloat16 and rounds the reordering up). Stepping on one
#: micro-batch's gradient instead of the sum is off by about half the movement.
ACCUMULATION_RTOL = 0.05
#: the logged losses of accumulated and bigger batches (3 steps): reordering alone stays far below
LOSS_ATOL = 1e-4


def _resolved(case):
    from ..registry import REGISTRY

    return REGISTRY.resolve(case.optim, check_installed=False)


def check_gradient_accumulation(case, tmp_dir) -> str:
    """``gradient_accumulation_steps=2`` x batch 2 == one batch of 4: same losses and weights (float tolerance)."""
    from ..testing import max_param_diff, run_training, tiny_llama

    resolved = _resolved(case)
    if not resolved.spec.capabilities.gradient_accumulation:
        raise Skip("not claimed (Capabilities.gradient_accumulation=False; the refusal is checked)")
    # transformers' default max_grad_norm=1.0: layerwise forms clip after the last micro-batch too
    kw = {"warmup_steps": 1, "weight_decay": 0.01, **case.args}
    tmp = Path(tmp_dir)
    big = run_training(case.optim, tmp / "big", steps=3, per_device_train_batch_size=4, **kw)
    acc = run_training(
        case.optim, tmp / "acc", steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, **kw
    )
    moved = max_param_diff(dict(tiny_llama().named_parameters()), big.params)
    diff = max_param_diff(big.params, acc.params)
    dloss = max(abs(a - b) for a, b in zip(big.losses, acc.losses))
    ok = diff <= ACCUMULATION_RTOL * moved and dloss <= LOSS_ATOL
    noise = None
    if not ok:
        # an update that turns rounding into movement (Newton-Schulz, eigendecompositions, then Adam's
        # normalisation) lands this far apart from any reordering of the same sums: measure that first
        noise = rounding_sensitivity(
            case.optim, tmp / "jitter", big, steps=3, per_device_train_batch_size=4, **kw
        )
        ok = diff <= NOISE_FACTOR * noise[0] and dloss <= max(LOSS_ATOL, NOISE_FACTOR * noise[1])
    assert ok, (
        f"{case.optim}: gradient_accumulation_steps=2 (2 x batch 2) trains other weights than one batch of 4 "
        f"after 3 steps: up to {diff:.3g} apart (losses {dloss:.3g}), while the weights moved {moved:.3g}"
        + (
            ""
            if noise is None
            else f", and a start one rounding step away lands only {noise[0]:.3g} apart (losses "
            f"{noise[1]:.3g})"
        )
        + ". The optimizer must read the accumulated .grad at step(), not gradients seen during backward; or "
        "declare Capabilities(gradient_accumulation=False) so that the trainer refuses accumulation"
    )
    if noise is not None:
        return (
            f"accumulated == bigger batch within {diff:.2g} (losses {dloss:.2g}; weights moved {moved:.2g}); "
            f"the update amplifies rounding: a start one rounding step away lands {noise[0]:.2g} "
            f"apart (losses {noise[1]:.2g})"
        )
    return f"accumulated == bigger batch within {diff:.2g} (weights moved {moved:.2g})"


@functools.lru_cache(maxsize=1)
def fp16_runnable() -> str | None:
    """``None`` when ``fp16=True`` trains with a GradScaler here; else why not (found by trying once)."""
    import tempfile

    import torch

    from ..testing import run_training

    with tempfile.TemporaryDirectory() as tmp:
        run = run_training("adamw_torch", tmp, steps=1, fp16=True, use_cpu=not torch.cuda.is_available())
        scaler = run.trainer.accelerator.scaler
    if scaler is not None:
        return None
    import accelerate

    return (
        f"accelerate {accelerate.__version__} uses fp16 autocast with a GradScaler only on a GPU; here "
        f"fp16=True trains on {run.trainer.args.device} without loss scaling (accelerator.scaler is None), "
        "so the claim cannot be exercised"
    )


def check_fp16(case, tmp_dir) -> str:
    """``fp16=True`` (autocast + loss scaling): finite losses that track the float32 run."""
    import torch

    from ..testing import run_training

    resolved = _resolved(case)
    if resolved.layerwise or not resolved.spec.capabilities.fp16:
        raise Skip("not claimed (the refusal is checked)")
    why = fp16_runnable()
    if why is not None:
        raise NotRunnable(why)
    cpu = not torch.cuda.is_available()
    kw = {**case.args, "use_cpu": cpu}
    half = run_training(case.optim, Path(tmp_dir) / "fp16", steps=8, fp16=True, **kw)
    full = run_training(case.optim, Path(tmp_dir) / "fp32", steps=8, **kw)
    assert all(math.isfinite(x) for x in half.losses), f"{case.optim}: fp16 losses {half.losses}"
    gap = max(abs(a - b) / abs(b) for a, b in zip(half.losses, full.losses))
    assert gap <= 0.02, (
        f"{case.optim}: with fp16=True the losses leave the float32 run's by {gap:.1%} within 8 steps "
        f"({half.losses} vs {full.losses}); the optimizer must see gradients the GradScaler unscaled"
    )
    return f"fp16 losses within {gap:.2%} of float32 over 8 steps"
