"""A Prodigy plugin as written for optitrainer 0.1.0 (kept unchanged: see ../README.md)."""

from optitrainer.plugin import BuildContext, OptimizerSpec, Option


def _build(ctx: BuildContext):
    from prodigyopt import Prodigy

    return Prodigy(ctx.param_groups(), lr=ctx.lr, d_coef=ctx.options["d_coef"], weight_decay=ctx.weight_decay)


def _validate(ctx: BuildContext) -> list:
    if ctx.args.learning_rate < 0.1:
        return [f"learning_rate={ctx.args.learning_rate} is far too small for Prodigy; use learning_rate=1.0"]
    return []


LEGACY_PRODIGY = OptimizerSpec(
    name="legacy_prodigy",
    factory=_build,
    summary="Prodigy (a plugin written for optitrainer 0.1.0)",
    requires=("prodigyopt",),
    imports=("prodigyopt",),
    options=(Option("d_coef", float, 1.0, "scales the estimated step size", low=0.0),),
    validate=_validate,
)
