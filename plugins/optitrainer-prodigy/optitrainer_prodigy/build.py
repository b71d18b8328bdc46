"""The factory: upstream ``prodigyopt.Prodigy`` over the trainer's param groups."""

from __future__ import annotations

import contextlib
import io

from optitrainer.plugin import BuildContext


def build(ctx: BuildContext):
    from prodigyopt import Prodigy

    o = ctx.options
    with contextlib.redirect_stdout(io.StringIO()):  # upstream prints "Using decoupled weight decay"
        return Prodigy(
            # decayed and not-decayed groups as transformers.Trainer builds them (not biases, not norms)
            ctx.param_groups(),
            lr=ctx.lr,
            **ctx.adam_kwargs(),
            weight_decay=ctx.weight_decay,
            beta3=o["beta3"],
            decouple=o["decouple"],
            use_bias_correction=o["use_bias_correction"],
            safeguard_warmup=o["safeguard_warmup"],
            d0=o["d0"],
            d_coef=o["d_coef"],
            growth_rate=float("inf") if o["growth_rate"] is None else o["growth_rate"],
            fsdp_in_use=False,  # FSDP/ZeRO are refused; under DDP every rank holds whole parameters
            slice_p=o["slice_p"],
        )


def log_values(optimizer) -> dict[str, float]:
    d = optimizer.param_groups[0].get("d") if optimizer.param_groups else None
    return {} if d is None else {"prodigy_d": float(d)}
