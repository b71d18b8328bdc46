"""A complete third-party optitrainer plugin: Signum (Bernstein et al., 2018, "signSGD").

The update is ``p -= lr * (sign(m) + weight_decay * p)`` with ``m = momentum * m + (1 - momentum) * grad``.
Install this folder (``pip install examples/third_party_plugin``) and ``optim="signum"`` works in
``OptiTrainer`` -- nothing else changes.
"""

from optitrainer.plugin import BuildContext, Capabilities, OptimizerSpec, Option


def _build(ctx: BuildContext):
    from .optimizer import Signum  # torch is imported only when the optimizer is built

    return Signum(ctx.param_groups(), lr=ctx.lr, momentum=ctx.options["momentum"])


SIGNUM = OptimizerSpec(
    name="signum",
    factory=_build,
    summary="Signum: SGD on the sign of the momentum (1 state per parameter)",
    aliases=("signsgd_momentum",),
    options=(
        Option(
            "momentum",
            float,
            0.9,
            "momentum of the averaged gradient",
            low=0.0,
            high=1.0,
            high_exclusive=True,
        ),
    ),
    # elementwise and deterministic: right per parameter (layerwise) and under DDP (the default claim);
    # `optitrainer check signum` exercises every claim
    capabilities=Capabilities(layerwise=True),
    # a sign update moves every weight by lr: AdamW-like rates, a few times smaller than Adam's 3e-3 peak
    recommended_lr=1e-3,
)
