"""optitrainer plugin: ``optim="grokadamw"`` (GrokAdamW, https://github.com/cognitivecomputations/grokadamw).

Nothing heavy is imported here (``optitrainer list`` imports this module): the optimizer class
(:mod:`optitrainer_grokadamw.optimizer`, which imports torch and ``grokadamw``) and the trainer callback
are imported inside the factories.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optitrainer.plugin import DISTRIBUTED_MODES, BuildContext, Capabilities, OptimizerSpec, Option

if TYPE_CHECKING:
    from .optimizer import GrokAdamW

__all__ = ["GROKADAMW", "GrokAdamW", "GrokkingSignalCallback"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # lazy: `from optitrainer_grokadamw import GrokAdamW`
    if name == "GrokAdamW":
        from .optimizer import GrokAdamW

        return GrokAdamW
    if name == "GrokkingSignalCallback":
        from .callback import GrokkingSignalCallback

        return GrokkingSignalCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build(ctx: BuildContext):
    from .optimizer import GrokAdamW

    o = ctx.options
    # transformers passes only lr and the five options below (betas and eps fall back to upstream's
    # defaults); here the training arguments' betas and eps reach the optimizer too. Weight decay is
    # per group: the arguments' weight_decay, not on biases and norms.
    return GrokAdamW(
        ctx.param_groups(),
        lr=ctx.lr,
        **ctx.adam_kwargs(),
        alpha_init=o["alpha_init"],
        lamb=o["lamb"],
        gamma=o["gamma"],
        grokking_signal_decay_rate=o["grokking_signal_decay_rate"],
        gradient_clipping=o["gradient_clipping"],
    )


def _callbacks(optimizer) -> list:
    from .callback import GrokkingSignalCallback

    return [GrokkingSignalCallback(optimizer)]


def _log_values(optimizer) -> dict[str, float]:
    signal = getattr(optimizer, "last_grokking_signal", None)
    return {} if signal is None else {"grokking_signal": float(signal)}


GROKADAMW = OptimizerSpec(
    name="grokadamw",
    factory=_build,
    summary="GrokAdamW: AdamW on the gradient plus a slow gradient EMA, fed by the train/eval loss gap",
    requires=("grokadamw==0.1.2",),
    imports=("grokadamw",),
    options=(
        Option(
            "alpha_init", float, 0.98, "base decay of the slow gradient EMA (grok_ema)", low=0.0, high=1.0
        ),
        Option("lamb", float, 2.0, "weight of the slow gradient EMA added to the gradient"),
        Option(
            "gamma",
            float,
            0.1,
            "per-position decay of beta1: the i-th parameter of a group uses beta1 * (1 - gamma) ** i",
        ),
        Option(
            "grokking_signal_decay_rate",
            float,
            0.1,
            "how fast the grokking signal lowers the EMA decay: alpha = alpha_init * exp(-rate * signal)",
        ),
        Option(
            "gradient_clipping",
            float,
            1.0,
            "clip each parameter's gradient to this norm inside the optimizer (0 disables)",
            low=0.0,
        ),
    ),
    capabilities=Capabilities(
        # beta1 depends on a parameter's position in its group: one optimizer per parameter
        # would give every parameter position 0, i.e. another optimizer
        layerwise=False,
        # ZeRO/FSDP flatten or shard parameters, which changes the per-parameter positions and
        # the per-parameter clipping norms; DDP keeps whole parameters on every rank
        distributed=DISTRIBUTED_MODES & {"ddp"},
        distributed_note="its per-parameter positions and clipping norms change on flattened or sharded tensors",
    ),
    transformers_name="grokadamw",
    callbacks=_callbacks,
    log_values=_log_values,
    docs=(
        "GrokAdamW adds `lamb * grok_ema` (an EMA of the gradient) to the gradient before an AdamW update, "
        "with beta1 decayed by `(1 - gamma) ** i` for the i-th parameter of a group and each parameter's "
        "gradient clipped to `gradient_clipping`. The EMA decay `alpha_init` is lowered by the grokking "
        "signal `max(0, eval_loss - train_loss) / max(eval_loss, train_loss)`: optitrainer feeds it the "
        "latest logged training loss and evaluation loss (so evaluate during training for it to act) and "
        "logs it as `grokking_signal`. Unlike transformers, the arguments' adam_beta1/adam_beta2/"
        "adam_epsilon are used, and the optimizer state is standard (resumes exactly, loads with "
        "weights_only=True) and stays on the parameters' device."
    ),
)
