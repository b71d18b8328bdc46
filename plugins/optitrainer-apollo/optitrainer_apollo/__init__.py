"""optitrainer plugin: APOLLO (``optim="apollo_adamw"``) and APOLLO-Mini (``optim="apollo_mini"``).

APOLLO (https://github.com/zhuhanqing/APOLLO, ``pip install apollo-torch``) keeps AdamW's moments in
a random low-rank projection of each selected ``nn.Linear`` weight's gradient and uses them only to
scale the full-rank gradient (per channel or per tensor). APOLLO-Mini is the rank-1, tensor-scaled
preset of the transformers guide. Both run layerwise (``apollo_adamw_layerwise``,
``apollo_mini_layerwise``) through the core's engine.

This module is imported by ``optitrainer list``: it imports neither torch nor apollo-torch; the
factory does, when the optimizer is built.

How it differs from ``transformers.Trainer``'s ``apollo_adamw`` (see README.md for the evidence):

* ``adam_beta1``/``adam_beta2``/``adam_epsilon`` reach every group and ``weight_decay`` is honoured
  (not on biases and norms). transformers gives betas/eps only to the projected group (the others
  get apollo-torch's defaults, eps=1e-6) and no weight decay to any group.
* ``*_layerwise`` draws the same random projections as the one-optimizer form (each parameter keeps
  the seed it has there), so both train to the same numbers. transformers seeds every per-parameter
  optimizer with 1.
* Checkpoints resume exactly: the optimizer state is tensors and numbers (transformers saves
  projector objects, which ``torch.load(weights_only=True)`` refuses).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

from optitrainer.plugin import BuildContext, Capabilities, OptimizerSpec, Option

if TYPE_CHECKING:
    import torch

__all__ = ["APOLLO_ADAMW", "APOLLO_MINI", "projection_seeds"]

REQUIRES = ("apollo-torch==1.0.3",)
IMPORTS = ("apollo_torch",)
GUIDE_TARGETS = "optim_target_modules=[r'.*.attn.*', r'.*.mlp.*']"

#: the keys of a projected (APOLLO) param group, as transformers passes them to apollo-torch
APOLLO_GROUP_KEYS = ("rank", "proj", "scale_type", "update_proj_gap", "scale", "proj_type")


def _options(rank: int, scale_type: str, scale: float) -> tuple[Option, ...]:
    return (
        Option(
            "rank", int, rank, "rank of the auxiliary sub-space used to estimate the gradient scaling", low=1
        ),
        Option(
            "proj",
            str,
            "random",
            "projection: 'random' (APOLLO; no SVD) or 'svd' (GaLore's SVD projector)",
            choices=("random", "svd"),
        ),
        Option(
            "scale_type",
            str,
            scale_type,
            "scaling factors per channel ('channel') or one per tensor ('tensor', APOLLO-Mini)",
            choices=("channel", "tensor"),
        ),
        Option(
            "scale",
            float,
            scale,
            "multiplies the scaled gradient; n/r (original/low-rank dimension) compensates a low rank",
            low=0.0,
        ),
        Option("update_proj_gap", int, 200, "steps between two refreshes of the projection matrix", low=1),
        Option(
            "proj_type",
            str,
            "std",
            "which side is projected: 'std' (the smaller dimension), 'reverse_std', 'left', 'right', "
            "'full' (both; proj='svd' and scale_type='tensor' only)",
            choices=("std", "reverse_std", "left", "right", "full"),
        ),
    )


# --- target modules -----------------------------------------------------------------------------
def _all_targets(ctx: BuildContext) -> list[tuple[str, torch.nn.Parameter]]:
    """Every selected ``nn.Linear`` weight of the whole model (frozen ones too, as transformers counts them)."""
    whole = replace(ctx, parameters=list(ctx.model.named_parameters()))
    return whole.target_linear_parameters()[0]


def projection_seeds(ctx: BuildContext) -> dict[str, int]:
    """The projection seed of every parameter of the model, by name.

    apollo-torch seeds parameter ``p`` with its 1-based position in the flattened param groups, and
    transformers lays them out as ``[every non-target parameter] + [every target weight]`` (model
    order, frozen parameters included). The same numbers are used here in both the one-optimizer
    and the per-parameter (layerwise) forms, so the two draw identical projections.
    """
    return _seed_layout(ctx, {n for n, _ in _all_targets(ctx)})


def _seed_layout(ctx: BuildContext, targets: set[str]) -> dict[str, int]:
    names = [n for n, _ in ctx.model.named_parameters()]
    layout = [n for n in names if n not in targets] + [n for n in names if n in targets]
    return {n: i for i, n in enumerate(layout, start=1)}


def _problems(ctx: BuildContext, targets: list | None = None) -> list[str]:
    o = ctx.options
    out: list[str] = []
    if o["scale_type"] == "channel" and o["proj_type"] != "std":
        out.append(
            f"optim_args scale_type='channel' with proj_type={o['proj_type']!r}: apollo-torch takes the channel "
            "norms along the dimension that proj_type='std' keeps, so with another projection the scaling "
            "factors do not fit the gradient (a shape error on the first step, or a wrong broadcast); "
            "use proj_type='std' or scale_type='tensor'"
        )
    if o["proj_type"] == "full" and o["proj"] != "svd":
        out.append(
            "optim_args proj_type='full' needs proj='svd' (apollo-torch's random projector does not implement "
            "it); use proj='svd' or proj_type='std'"
        )
    patterns = ctx.args.optim_target_modules
    if patterns is None:
        return out  # the core reports the missing optim_target_modules (needs_target_modules)
    if not isinstance(patterns, (str, list, tuple)):
        out.append(
            f"optim_target_modules={patterns!r} is a {type(patterns).__name__}; give a list of names or regexes, "
            f"a regex string, or 'all-linear', e.g. {GUIDE_TARGETS}"
        )
        return out
    if not (_all_targets(ctx) if targets is None else targets):
        from torch import nn

        linears = [n for n, m in ctx.model.named_modules() if isinstance(m, nn.Linear)]
        shown = linears[:6] or [n for n, _ in ctx.model.named_modules() if n][:6]
        kind = "its nn.Linear layers include" if linears else "it has no nn.Linear layer; its modules include"
        out.append(
            f"optim_target_modules={patterns!r} matches no nn.Linear layer of {type(ctx.model).__name__}, so "
            f"{ctx.name} would project nothing ({kind}: {', '.join(shown)}); match those names, e.g. "
            f"{GUIDE_TARGETS} for a Llama, or optim_target_modules='all-linear'"
        )
    return out


def _validate(ctx: BuildContext) -> list[str]:
    problems = _problems(ctx)
    patterns = ctx.args.optim_target_modules
    if isinstance(patterns, (str, list, tuple)):
        ignored = replace(ctx, parameters=list(ctx.model.named_parameters())).target_linear_parameters()[1]
        if ignored:
            warnings.warn(
                f"optim_target_modules={patterns!r} matched {len(ignored)} module(s) that are not nn.Linear: "
                f"{', '.join(ignored[:10])}{' ...' if len(ignored) > 10 else ''}. {ctx.name} projects only "
                "nn.Linear weights; these are trained with its plain AdamW update. Narrow the patterns to "
                "silence this warning.",
                UserWarning,
                stacklevel=2,
            )
    return problems


# --- the factory ---------------------------------------------------------------------------------
def _build(ctx: BuildContext):
    from .optim import APOLLOAdamW

    targets = _all_targets(ctx)  # of the whole model, also when building for one parameter (layerwise)
    problems = _problems(ctx, targets)
    if problems:
        raise ValueError(f"optim={ctx.name!r} cannot be built: " + "; ".join(problems))
    target_ids = {id(p) for _, p in targets}
    apollo = {k: ctx.options[k] for k in APOLLO_GROUP_KEYS}
    base = ctx.param_groups()  # [decayed, not decayed], weight decay as the trainer decided
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in target_ids]} for g in base] + [
        {**g, **apollo, "params": [p for p in g["params"] if id(p) in target_ids]} for g in base
    ]
    seed_of = _seed_layout(ctx, {n for n, _ in targets})
    name_of = {id(p): n for n, p in ctx.named_parameters()}
    seeds = [seed_of[name_of[id(p)]] for g in groups for p in g["params"]]
    # layerwise: the engine frees each gradient after its step, so the update may overwrite it
    return APOLLOAdamW(groups, lr=ctx.lr, seeds=seeds, gradient_is_scratch=ctx.layerwise, **ctx.adam_kwargs())


CAPABILITIES = Capabilities(
    layerwise=True,
    needs_target_modules=True,
    # the projection needs each weight whole and 2-D: FSDP and DeepSpeed ZeRO shard or flatten them
    distributed=frozenset({"ddp"}),
    distributed_note="the projection needs each weight whole and 2-D; ZeRO flattens and FSDP shards them",
)

_DOCS = (
    "Groups: non-projected parameters first (decayed, not decayed), then the selected nn.Linear weights "
    "(decayed, not decayed) with the APOLLO keys. Every group gets learning_rate, adam_beta1/2 and "
    "adam_epsilon (transformers gives betas/eps to the projected group only); weight_decay applies to all "
    "but biases and norms (transformers applies none). `optim_target_modules` selects the projected layers "
    "with transformers' rule. Checkpoints hold tensors and numbers only and resume exactly; `_layerwise` "
    "draws the same random projections as the one-optimizer form."
)

APOLLO_ADAMW = OptimizerSpec(
    name="apollo_adamw",
    factory=_build,
    summary="APOLLO: AdamW-level updates with SGD-like memory (low-rank random projection of the scaling)",
    requires=REQUIRES,
    imports=IMPORTS,
    options=_options(rank=128, scale_type="channel", scale=1.0),
    capabilities=CAPABILITIES,
    transformers_name="apollo_adamw",
    validate=_validate,
    docs="Defaults are transformers' (rank=128; the guide's table says 256). " + _DOCS,
)

APOLLO_MINI = OptimizerSpec(
    name="apollo_mini",
    factory=_build,
    summary="APOLLO-Mini: the rank-1, tensor-scaled APOLLO preset (rank=1, scale_type=tensor, scale=128)",
    requires=REQUIRES,
    imports=IMPORTS,
    options=_options(rank=1, scale_type="tensor", scale=128.0),
    capabilities=CAPABILITIES,
    validate=_validate,
    docs="The same optimizer as apollo_adamw with the guide's APOLLO-Mini defaults, still overridable "
    "through optim_args. " + _DOCS,
)
