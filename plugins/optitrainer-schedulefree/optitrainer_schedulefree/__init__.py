"""Schedule-free AdamW, RAdam and SGD (Defazio et al., 2024) for optitrainer.

Three names, as ``transformers.Trainer`` knows them: ``schedule_free_adamw``,
``schedule_free_radam`` (alias ``schedule_free_radamw``, the name the transformers guide writes) and
``schedule_free_sgd``. Defaults and hyperparameters are transformers' (learning rate, betas, eps
and weight decay from the training arguments, ``warmup_steps`` as the optimizer's own warmup except
for RAdam), so the same arguments train to the same numbers; see the README for where and why this
plugin departs from transformers.

This module imports neither torch nor ``schedulefree``: ``optitrainer list`` imports it.
"""

from __future__ import annotations

import warnings
from typing import Any

from optitrainer.plugin import BuildContext, Capabilities, OptimizerSpec, Option

__all__ = ["SCHEDULE_FREE_ADAMW", "SCHEDULE_FREE_RADAM", "SCHEDULE_FREE_SGD"]

REQUIRES = ("schedulefree>=1.4.1,<1.5",)
IMPORTS = ("schedulefree",)

#: DDP keeps identical replicas, so the mode switches stay in step. FSDP/DeepSpeed shard or wrap the
#: parameters and the optimizer; the switches were not verified there.
CAPABILITIES = Capabilities(
    train_eval_modes=True,
    distributed=frozenset({"ddp"}),
    distributed_note="train()/eval() rewrite the optimizer's own tensors, which DeepSpeed ZeRO and FSDP keep "
    "apart from the model's weights: the weights evaluated and saved would be the train-mode ones",
)

_COMMON_OPTIONS = (
    Option(
        "weight_lr_power",
        float,
        2.0,
        "the weight of each iterate in the average is lr_max**weight_lr_power (0: uniform)",
        low=0.0,
    ),
    Option("r", float, 0.0, "polynomial weighting of the average: the weight grows like (k+1)**r", low=0.0),
    Option(
        "foreach",
        bool,
        None,
        "use torch's foreach kernels for the step (None: upstream's choice, True where torch has them)",
    ),
)


# -- the learning-rate story --------------------------------------------------------------------


def _scheduler_name(args: Any) -> str:
    kind = args.lr_scheduler_type
    return str(getattr(kind, "value", kind))


def _warmup_steps(args: Any) -> int | None:
    """``warmup_steps`` as a number of steps, as transformers' scheduler reads it.

    transformers passes ``args.warmup_steps`` to the optimizer as is; a ratio (``0 < warmup_steps <
    1``, e.g. 0.1) then gives a first step with ``1 / 0.1 = 10`` times the learning rate. The scheduler
    turns it into ``ceil(ratio * max_steps)`` steps: so does this plugin. ``None``: a ratio whose total
    number of steps is not known yet (epoch-based run); the trainer callback resolves it.
    """
    w = args.warmup_steps or 0
    if w >= 1 or w == 0:
        return int(w)
    if args.max_steps > 0:
        return args.get_warmup_steps(args.max_steps)
    return None


def _check_schedule(ctx: BuildContext, own_warmup: bool) -> None:
    """Warn when the trainer's schedule fights the optimizer's own (the guide recommends constant)."""
    args, name = ctx.args, ctx.name
    schedule = _scheduler_name(args)
    warmup = args.warmup_steps or 0
    problems = []
    if schedule != "constant":
        text = (
            f"lr_scheduler_type={schedule!r} rescales the learning rate on top of the optimizer's "
            "schedule-free averaging, which replaces annealing"
        )
        if own_warmup and warmup:
            text += (
                f"; with warmup_steps={warmup} the warmup is applied twice (the applied learning rate is "
                "the scheduler's times the optimizer's own warmup factor; the logged learning_rate is the "
                "applied one)"
            )
        problems.append(text)
    if not own_warmup and warmup:
        problems.append(
            f"{name} ignores warmup_steps={warmup}: its rectification warms it up by itself"
            + (" (only the scheduler applies it)" if schedule != "constant" else "")
        )
    if problems:
        warnings.warn(
            f"optim={name!r}: "
            + "; ".join(problems)
            + '. Set lr_scheduler_type="constant" (the transformers guide\'s recommendation for '
            "schedule-free optimizers)"
            + ("; the optimizer then does the warmup alone." if own_warmup else "."),
            UserWarning,
            stacklevel=3,
        )


def _log_values(optimizer) -> dict[str, float]:
    """Log the learning rate the last step applied, not the scheduler's.

    Upstream multiplies the scheduler's lr by its own warmup factor (AdamW, SGD) or RAdam's
    rectification and records the product in ``param_groups[i]["scheduled_lr"]``.
    """
    return {"learning_rate": float(optimizer.param_groups[0]["scheduled_lr"])}


def _callbacks(optimizer) -> list:
    from .trainer_callback import ScheduleFreeCallback

    return [ScheduleFreeCallback(optimizer)]


# -- factories ----------------------------------------------------------------------------------


def _common_kwargs(ctx: BuildContext) -> dict[str, Any]:
    o = ctx.options
    kwargs = {
        "lr": ctx.lr,
        "weight_decay": ctx.weight_decay,
        "weight_lr_power": o["weight_lr_power"],
        "r": o["r"],
    }
    if o["foreach"] is not None:
        kwargs["foreach"] = o["foreach"]
    return kwargs


def _warmup_kwargs(ctx: BuildContext) -> dict[str, Any]:
    steps = _warmup_steps(ctx.args)
    return {"warmup_steps": 0 if steps is None else steps}


def _build_adamw(ctx: BuildContext):
    from .optim import ScheduleFreeAdamW

    _check_schedule(ctx, own_warmup=True)
    return ScheduleFreeAdamW(
        ctx.param_groups(), **_common_kwargs(ctx), **ctx.adam_kwargs(), **_warmup_kwargs(ctx)
    )


def _build_radam(ctx: BuildContext):
    from .optim import ScheduleFreeRAdam

    _check_schedule(ctx, own_warmup=False)
    return ScheduleFreeRAdam(
        ctx.param_groups(),
        **_common_kwargs(ctx),
        **ctx.adam_kwargs(),
        silent_sgd_phase=ctx.options["silent_sgd_phase"],
    )


def _build_sgd(ctx: BuildContext):
    from .optim import ScheduleFreeSGD

    _check_schedule(ctx, own_warmup=True)
    return ScheduleFreeSGD(
        ctx.param_groups(), **_common_kwargs(ctx), momentum=ctx.options["momentum"], **_warmup_kwargs(ctx)
    )


def _validate_sgd(ctx: BuildContext) -> list[str]:
    momentum = ctx.options["momentum"]
    if not 0.0 < momentum < 1.0:
        return [
            f"momentum={momentum}: schedule_free_sgd interpolates with weight 1 - 1/momentum, so momentum "
            "must lie strictly between 0 and 1; set optim_args='momentum=0.9' (the default)"
        ]
    return []


_DOCS = """\
Schedule-free optimizers replace momentum by averaging and interpolation: the model holds the
train-mode point `y` during training steps and the averaged point `x` (the weights to evaluate and
ship) in eval mode. OptiTrainer switches the modes (`Capabilities(train_eval_modes=True)`):
evaluation and every weight save happen in eval mode, and training ends in eval mode, so
`trainer.model` holds the weights to use.

Differences from transformers (measured; see the plugin README):
- mode switches are exact: `eval()` keeps a copy of `y` in the optimizer state and `train()` puts
  it back, so evaluating and saving do not change training (costs one copy of the weights while in
  eval mode, and in the checkpoint);
- the logged `learning_rate` is the one the optimizer applied (scheduler x own warmup);
- a ratio `warmup_steps` (< 1) becomes `ceil(ratio * max_steps)` steps, as for the scheduler;
- a build-time warning recommends `lr_scheduler_type="constant"` (the guide's advice).
"""

SCHEDULE_FREE_ADAMW = OptimizerSpec(
    name="schedule_free_adamw",
    factory=_build_adamw,
    summary="Schedule-free AdamW: no lr schedule needed, eval mode averages the iterates",
    requires=REQUIRES,
    imports=IMPORTS,
    options=_COMMON_OPTIONS,
    capabilities=CAPABILITIES,
    transformers_name="schedule_free_adamw",
    callbacks=_callbacks,
    log_values=_log_values,
    docs=_DOCS + "\nWarmup: the optimizer's own, linear over `warmup_steps`.",
)

SCHEDULE_FREE_RADAM = OptimizerSpec(
    name="schedule_free_radam",
    factory=_build_radam,
    summary="Schedule-free RAdam: no lr schedule and no warmup needed",
    requires=REQUIRES,
    imports=IMPORTS,
    options=(
        *_COMMON_OPTIONS,
        Option(
            "silent_sgd_phase",
            bool,
            True,
            "while RAdam's rectification is undefined (first ~5 steps at beta2=0.999), update only the "
            "optimizer state, not the weights",
        ),
    ),
    aliases=("schedule_free_radamw",),
    capabilities=CAPABILITIES,
    transformers_name="schedule_free_radam",
    callbacks=_callbacks,
    log_values=_log_values,
    docs=_DOCS
    + "\nWarmup: none needed (RAdam's rectification); `warmup_steps` is not used by the optimizer.",
)

SCHEDULE_FREE_SGD = OptimizerSpec(
    name="schedule_free_sgd",
    factory=_build_sgd,
    summary="Schedule-free SGD with momentum-like interpolation",
    requires=REQUIRES,
    imports=IMPORTS,
    options=(
        *_COMMON_OPTIONS,
        Option(
            "momentum",
            float,
            0.9,
            "interpolation between the average x and the SGD iterate z (0 < momentum < 1)",
            low=0.0,
            high=1.0,
        ),
    ),
    capabilities=CAPABILITIES,
    transformers_name="schedule_free_sgd",
    validate=_validate_sgd,
    callbacks=_callbacks,
    log_values=_log_values,
    docs=_DOCS + "\nWarmup: the optimizer's own, linear over `warmup_steps`.",
)
