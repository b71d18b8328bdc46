"""An elementwise Adam plugin as written for optitrainer 0.1.0 (kept unchanged: see ../README.md).

Its update is elementwise, so it claims the layerwise form (``legacy_adam_layerwise``) and every
distributed engine: DDP, DeepSpeed (every ZeRO stage) and FSDP (both versions).
"""

from optitrainer.plugin import BuildContext, Capabilities, OptimizerSpec, Option


def _build(ctx: BuildContext):
    import torch

    o = ctx.options
    return torch.optim.AdamW(
        ctx.param_groups(), lr=ctx.lr, betas=o["betas"], eps=o["eps"], amsgrad=o["amsgrad"]
    )


def _validate(ctx: BuildContext) -> list:
    import torch

    problems = []
    if any(b == 1.0 for b in ctx.options["betas"]):
        problems.append(
            f"betas={ctx.options['betas']}: a beta of 1 never forgets the first gradient; use betas below 1"
        )
    half = [n for n, p in ctx.named_parameters() if p.dtype == torch.float16]
    if half and ctx.options["eps"] < 1e-7:
        problems.append(
            f"eps={ctx.options['eps']} underflows in float16 (e.g. {half[0]}); use eps=1e-7 or more, or bfloat16"
        )
    return problems


LEGACY_ADAM = OptimizerSpec(
    name="legacy_adam",
    factory=_build,
    summary="AdamW with typed options (a plugin written for optitrainer 0.1.0)",
    imports=("torch",),
    options=(
        Option("betas", tuple, (0.9, 0.999), "coefficients of the running averages", low=0.0, high=1.0),
        Option("eps", float, 1e-8, "added to the denominator", low=0.0, high=1.0),
        Option("amsgrad", bool, False, "keep the maximum of past second moments"),
    ),
    capabilities=Capabilities(layerwise=True, distributed=frozenset({"ddp", "deepspeed", "fsdp"})),
    validate=_validate,
)
