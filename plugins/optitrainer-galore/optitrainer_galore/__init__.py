"""GaLore (gradient low-rank projection) for OptiTrainer: ``galore_adamw``, ``galore_adamw_8bit``,
``galore_adafactor``, each also as ``<name>_layerwise``.

The weights of the ``nn.Linear`` modules selected by ``optim_target_modules`` get their gradient
projected to ``rank`` dimensions (the projection is refreshed every ``update_proj_gap`` steps from an
SVD of the gradient, and the update projected back is multiplied by ``scale``); every other parameter
is optimized normally, by the same optimizer.

This module must stay cheap to import (``optitrainer list`` imports it): torch and galore-torch are
imported inside the factories only.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from optitrainer.plugin import BuildContext, Capabilities, OptimizerSpec, Option

__all__ = ["GALORE_ADAFACTOR", "GALORE_ADAMW", "GALORE_ADAMW_8BIT", "galore_param_groups"]

REQUIRES = ("galore-torch==1.0",)
IMPORTS = ("galore_torch",)

GALORE_OPTIONS = (
    Option("rank", int, 128, "rank of the projected gradient (capped by the matrix's smaller side)", low=1),
    Option(
        "update_proj_gap",
        int,
        200,
        "recompute the projection (SVD of the gradient) every this many steps",
        low=1,
    ),
    Option("scale", float, 0.25, "factor applied to the update once projected back to full rank", low=0.0),
    Option(
        "proj_type",
        str,
        "std",
        "which side(s) of the gradient matrix are projected: std projects the smaller side, reverse_std the "
        "larger, right/left always that side, full both",
        choices=("std", "reverse_std", "right", "left", "full"),
    ),
)

# Distributed: DDP all-reduces full gradients before the step, so GaLore sees the real matrices. FSDP and
# DeepSpeed ZeRO hand the optimizer flattened shards: there is no weight matrix left to project.
# The layerwise form is single-process only (the core's compatibility check says so).
_CAPS = Capabilities(
    layerwise=True,
    needs_target_modules=True,
    distributed=frozenset({"ddp"}),
    distributed_note="the projection needs each weight whole and 2-D; ZeRO flattens and FSDP shards them",
)
_CAPS_8BIT = dataclasses.replace(_CAPS, requires_cuda=True)


def galore_param_groups(ctx: BuildContext, galore: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameter groups: the plain parameters first, then the projected ones (as transformers).

    ``[plain + decay, plain + no decay, projected + decay, projected + no decay]``: the weight-decay split
    is the trainer's (no decay on biases and norms); ``galore`` (rank, update_proj_gap, scale, proj_type)
    goes into the projected groups. The four groups always exist in the standard form, so checkpoints do
    not depend on the model; a layerwise per-parameter optimizer keeps its one non-empty group.
    """
    selected, _ = ctx.target_linear_parameters()
    target_ids = {id(p) for _, p in selected}
    named = ctx.named_parameters()
    plain = [(n, p) for n, p in named if id(p) not in target_ids]
    projected = [(n, p) for n, p in named if id(p) in target_ids]
    groups = dataclasses.replace(ctx, parameters=plain).param_groups()
    groups += dataclasses.replace(ctx, parameters=projected).param_groups(galore)
    if ctx.layerwise:
        groups = [g for g in groups if g["params"]]
    return groups


def _galore_options(ctx: BuildContext) -> dict[str, Any]:
    o = ctx.options
    return {k: o[k] for k in ("rank", "update_proj_gap", "scale", "proj_type")}


def _build_adamw(ctx: BuildContext):
    from .optimizers import GaLoreAdamW

    # layerwise: the engine frees each gradient after its step, so the update may overwrite it
    return GaLoreAdamW(
        galore_param_groups(ctx, _galore_options(ctx)),
        lr=ctx.lr,
        gradient_is_scratch=ctx.layerwise,
        **ctx.adam_kwargs(),
    )


def _build_adamw_8bit(ctx: BuildContext):
    from .optimizers import GaLoreAdamW8bit

    return GaLoreAdamW8bit(
        galore_param_groups(ctx, _galore_options(ctx)),
        lr=ctx.lr,
        weight_decay=ctx.weight_decay,
        min_8bit_size=ctx.options["min_8bit_size"],
        **ctx.adam_kwargs(),
    )


def _build_adafactor(ctx: BuildContext):
    from .optimizers import GaLoreAdafactor

    o = ctx.options
    return GaLoreAdafactor(
        galore_param_groups(ctx, _galore_options(ctx)),
        lr=ctx.lr,
        relative_step=False,  # the learning rate is the trainer's schedule, in both forms
        warmup_init=False,
        scale_parameter=o["scale_parameter"],
        clip_threshold=o["clip_threshold"],
        decay_rate=o["decay_rate"],
        beta1=o["beta1"],
        gradient_is_scratch=ctx.layerwise,  # the engine frees each gradient after its step
    )


def _linear_names(model, limit: int = 6) -> list[str]:
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:limit]


def validate_targets(ctx: BuildContext) -> list[str]:
    """Before training: the patterns must select some ``nn.Linear``; matched non-Linear leaves are reported."""
    patterns = ctx.args.optim_target_modules
    if patterns is None:
        return []  # the core reports it (needs_target_modules)
    if not isinstance(patterns, (str, list, tuple)):
        return [
            f"optim_target_modules={patterns!r} must be a list of module names or regexes, a regex string, "
            "or 'all-linear'"
        ]
    selected, ignored = ctx.target_linear_parameters()
    if ignored:
        warnings.warn(
            f"{ctx.name}: optim_target_modules={patterns!r} matches module(s) that are not nn.Linear: "
            f"{', '.join(ignored)}. GaLore projects only nn.Linear weights; these are optimized normally "
            "(full rank). Narrow optim_target_modules to silence this warning.",
            UserWarning,
            stacklevel=2,
        )
    if selected:
        return []
    names = _linear_names(ctx.model)
    if names:
        hint = "the model's nn.Linear modules include " + ", ".join(repr(n) for n in names)
    else:
        hint = "the model has no trainable nn.Linear module"
    return [
        f"optim_target_modules={patterns!r} selects no nn.Linear layer of {type(ctx.model).__name__} "
        f"({hint}); pass names, substrings or regexes of those modules, e.g. "
        "optim_target_modules=[r'.*.attn.*', r'.*.mlp.*'], or optim_target_modules='all-linear'"
    ]


_DOCS = """\
Gradient Low-Rank Projection (https://arxiv.org/abs/2403.03507), from `galore-torch`.

Only the weights of the `nn.Linear` modules selected by `optim_target_modules` (a list of names,
substrings or regexes, a regex string, or `'all-linear'`; transformers' matching rule) are projected;
every other parameter is optimized by the same optimizer at full rank.

Unlike `transformers.Trainer`, which hands GaLore the learning rate only, optitrainer applies the
training arguments' `weight_decay` (not on biases and norms) and, for the Adam variants,
`adam_beta1`/`adam_beta2`/`adam_epsilon`. Checkpoints hold the projection matrices as tensors, so
`resume_from_checkpoint` works (it crashes in transformers) and is exact.
"""

GALORE_ADAMW = OptimizerSpec(
    name="galore_adamw",
    factory=_build_adamw,
    summary="GaLore AdamW: Adam on rank-`rank` projections of the target linear layers' gradients",
    requires=REQUIRES,
    imports=IMPORTS,
    options=GALORE_OPTIONS,
    capabilities=_CAPS,
    transformers_name="galore_adamw",
    validate=validate_targets,
    docs=_DOCS,
)

GALORE_ADAMW_8BIT = OptimizerSpec(
    name="galore_adamw_8bit",
    factory=_build_adamw_8bit,
    summary="GaLore AdamW with bitsandbytes 8-bit states (CUDA only)",
    requires=(*REQUIRES, "bitsandbytes"),
    imports=(*IMPORTS, "bitsandbytes"),
    options=(
        *GALORE_OPTIONS,
        Option("min_8bit_size", int, 4096, "tensors with fewer elements keep 32-bit states", low=1),
    ),
    capabilities=_CAPS_8BIT,
    transformers_name="galore_adamw_8bit",
    validate=validate_targets,
    docs=_DOCS
    + "\nThe upstream step calls `torch.cuda.synchronize()`: without a CUDA device it is refused before "
    "training (transformers crashes in the first optimizer step instead).\n",
)

GALORE_ADAFACTOR = OptimizerSpec(
    name="galore_adafactor",
    factory=_build_adafactor,
    summary="GaLore Adafactor: factored second moments on projected gradients, external learning rate",
    requires=REQUIRES,
    imports=IMPORTS,
    options=(
        *GALORE_OPTIONS,
        Option("scale_parameter", bool, False, "scale the learning rate by the parameter's RMS"),
        Option("clip_threshold", float, 1.0, "threshold of the update's root mean square", low=0.0),
        Option("decay_rate", float, -0.8, "coefficient of the second-moment running average"),
        Option(
            "beta1", float, None, "first-moment coefficient; None keeps no first moment", low=0.0, high=1.0
        ),
    ),
    capabilities=_CAPS,
    transformers_name="galore_adafactor",
    validate=validate_targets,
    docs=_DOCS
    + "\nThe learning rate is the trainer's schedule (`relative_step=False`) in both the standard and the "
    "layerwise form (transformers' layerwise form builds `relative_step=True` Adafactors and fails).\n",
)
