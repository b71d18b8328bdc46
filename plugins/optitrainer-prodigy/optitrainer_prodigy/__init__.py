"""optitrainer plugin: ``optim="prodigy"`` (alias ``prodigyopt``), https://github.com/konstmish/prodigy.

Nothing heavy is imported here (``optitrainer list`` imports this module): the factory
(:mod:`optitrainer_prodigy.build`, which imports torch and ``prodigyopt``) is imported when the
optimizer is built.
"""

from __future__ import annotations

from typing import Any

from optitrainer.plugin import BuildContext, Capabilities, OptimizerSpec, Option

__all__ = ["PRODIGY", "LEARNING_RATE_RANGE", "MIN_LEARNING_RATE", "RECOMMENDED_LEARNING_RATE"]

__version__ = "0.1.0"

#: Prodigy's authors: "Leave LR set to 1 unless you encounter instability"
RECOMMENDED_LEARNING_RATE = 1.0
#: where it learned in the kit's run (`optitrainer check prodigy --measure-lr`: 48 steps of the tiny Llama,
#: constant rate; not at 0.1 nor 100): optitrainer warns outside it
LEARNING_RATE_RANGE = (0.2, 50.0)
#: below this the method is a near no-op (README, "Why small learning rates are refused")
MIN_LEARNING_RATE = 1e-2


def _build(ctx: BuildContext):
    from .build import build

    return build(ctx)


def _log_values(optimizer) -> dict[str, float]:
    from .build import log_values

    return log_values(optimizer)


def _validate_arguments(args: Any, options: dict[str, Any]) -> list[str]:
    problems = []
    lr = getattr(args, "learning_rate", None)
    if lr is not None and lr < MIN_LEARNING_RATE:
        problems.append(
            f"learning_rate={lr:g} makes Prodigy a near no-op. Prodigy estimates its step size d itself and "
            f"moves the weights by learning_rate x d; d starts at d0={options.get('d0', 1e-6):g} and each "
            f"step grows by an amount proportional to learning_rate, so below {MIN_LEARNING_RATE:g} both "
            "stay tiny and the loss does not move (transformers' default 5e-05 is an Adam learning rate). "
            f"Set learning_rate={RECOMMENDED_LEARNING_RATE:g}; to take smaller or larger steps change "
            "optim_args 'd_coef' (e.g. d_coef=0.5) instead"
        )
    return problems


def _measured_range() -> dict[str, Any]:
    """``learning_rate_range`` where optitrainer has it (plugin API 1.2); older releases warn at 100x."""
    import dataclasses

    if "learning_rate_range" in {f.name for f in dataclasses.fields(OptimizerSpec)}:
        return {"learning_rate_range": LEARNING_RATE_RANGE}
    return {}


PRODIGY = OptimizerSpec(
    name="prodigy",
    aliases=("prodigyopt",),
    factory=_build,
    summary="Prodigy: Adam whose step size d is estimated on the fly (run it at learning_rate=1.0)",
    requires=("prodigyopt==1.1.2",),
    imports=("prodigyopt",),
    options=(
        Option("d0", float, 1e-6, "initial estimate of the step size d", low=0.0, low_exclusive=True),
        Option(
            "d_coef",
            float,
            1.0,
            "multiplies the estimate of d: the preferred knob (0.5 smaller steps, 2.0 larger)",
            low=0.0,
            low_exclusive=True,
        ),
        Option(
            "growth_rate",
            float,
            None,
            "d may grow at most by this factor per step (e.g. 1.02: a warmup-like ramp); None: unrestricted",
            low=1.0,
        ),
        Option(
            "beta3",
            float,
            None,
            "decay of the running sums behind the estimate of d; None: sqrt(adam_beta2)",
            low=0.0,
            high=1.0,
            high_exclusive=True,
        ),
        Option("use_bias_correction", bool, False, "Adam's bias correction of the step size"),
        Option(
            "safeguard_warmup",
            bool,
            False,
            "leave the learning rate out of d's denominator, so a warmup does not inflate d (use with warmup)",
        ),
        Option(
            "decouple",
            bool,
            True,
            "AdamW-style decoupled weight decay (False: L2 penalty added to the gradient)",
        ),
        Option(
            "slice_p",
            int,
            1,
            "estimate d from every p-th element of each tensor (less memory; >1 approximates Prodigy, ~11 works)",
            low=1,
        ),
    ),
    capabilities=Capabilities(
        # d is one number estimated from sums over every parameter: one optimizer per parameter
        # would estimate one d per parameter, another method
        layerwise=False,
        distributed=frozenset({"ddp"}),
        distributed_note=(
            "its step size d comes from sums over all parameters; ZeRO and FSDP give each rank a shard, so "
            "each rank would estimate its own d (upstream's fsdp_in_use all-reduce is CUDA-only and "
            "covers FSDP1's flat parameters only)"
        ),
    ),
    validate_arguments=_validate_arguments,
    recommended_lr=RECOMMENDED_LEARNING_RATE,
    **_measured_range(),
    log_values=_log_values,
    docs=(
        "Prodigy (Mishchenko & Defazio, 2023, arXiv:2306.06101) is Adam with a step size d it estimates "
        "from the distance travelled since the start; the learning rate multiplies that estimate. Run it "
        "at learning_rate=1.0 (its recommended value): small learning rates are refused because they "
        "make it a no-op. Scale steps with optim_args 'd_coef'. From the training arguments: "
        "adam_beta1/adam_beta2/adam_epsilon and weight_decay (not on biases and norms, as transformers "
        "decides). The estimate is logged as prodigy_d and kept in checkpoints."
    ),
)
