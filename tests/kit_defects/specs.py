"""The specs: ``kd_<defect>``, each with the one defect its name says, and correct controls."""

from __future__ import annotations

from optitrainer.plugin import Capabilities, OptimizerSpec, Option


def _lion(maximize: bool):
    def build(ctx):
        from kit_defects.optimizers import Lion

        return Lion(ctx.param_groups(), lr=ctx.lr, maximize=maximize)

    return build


#: loss rises 4.58 -> 5.59: passes resume, scheduled lr and layerwise exactness all the same
LION_MAXIMIZE = OptimizerSpec(
    name="kd_lion_maximize",
    factory=_lion(True),
    summary="Lion with maximize=True",
    capabilities=Capabilities(layerwise=True),
)
LION = OptimizerSpec(name="kd_lion", factory=_lion(False), summary="Lion (control)")


def _sgd_momentum(ctx):
    import torch

    return torch.optim.SGD(ctx.param_groups(), lr=ctx.lr, momentum=0.9)


#: correct; learns at lr 0.1, not at 1e-3 on the tiny model, declares no recommended_lr
SGD_MOMENTUM = OptimizerSpec(
    name="kd_sgd_momentum", factory=_sgd_momentum, summary="SGD, momentum 0.9 (control)"
)


def _schedulefree(ctx):
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(ctx.param_groups(), lr=ctx.lr, warmup_steps=0)


#: has train()/eval() but does not declare them: evaluation and saving would use the train-mode weights
MODES_UNDECLARED = OptimizerSpec(
    name="kd_modes_undeclared", factory=_schedulefree, summary="schedule-free AdamW, modes undeclared"
)


def _adamw(ctx):
    import torch

    return torch.optim.AdamW(ctx.param_groups(), lr=ctx.lr)


#: declares train/eval modes that torch's AdamW does not have
MODES_CLAIMED = OptimizerSpec(
    name="kd_modes_claimed",
    factory=_adamw,
    summary="AdamW claiming train/eval modes",
    capabilities=Capabilities(train_eval_modes=True),
)


def _sgd_ignoring_options(ctx):
    import torch

    return torch.optim.SGD(ctx.param_groups(), lr=ctx.lr, momentum=ctx.options["momentum"])


#: `dampening` is declared and parsed, but the factory never passes it on
DEAD_OPTION = OptimizerSpec(
    name="kd_dead_option",
    factory=_sgd_ignoring_options,
    summary="SGD whose dampening option goes nowhere",
    options=(
        Option("momentum", float, 0.0, "momentum", low=0.0, high=1.0, high_exclusive=True),
        Option("dampening", float, 0.0, "dampening (ignored: the defect)", low=0.0, high=1.0),
    ),
)

#: a typo in imports ("schedulfree"); the requirement is installed, so this is a failure, not a skip
IMPORT_TYPO = OptimizerSpec(
    name="kd_import_typo",
    factory=_schedulefree,
    summary="imports names a module that does not exist",
    requires=("schedulefree>=1.4.1,<1.5",),
    imports=("schedulfree",),
)

#: a genuinely absent upstream: skipped, with the pip command
ABSENT_UPSTREAM = OptimizerSpec(
    name="kd_absent_upstream",
    factory=_adamw,
    summary="needs a package that is not installed",
    requires=("optitrainer-kit-absent-upstream==1.0",),
    imports=("optitrainer_kit_absent_upstream",),
)


def _build(cls_name):
    def build(ctx):
        import kit_defects.optimizers as o

        return getattr(o, cls_name)(ctx.param_groups(), lr=ctx.lr)

    return build


#: the loss spikes at steps 2-3 and returns to the untrained model's: the old first-3 vs last-3 mean passed it
SPIKE_THEN_UNDO = OptimizerSpec(
    name="kd_spike_then_undo", factory=_build("SpikeThenUndoSGD"), summary="spikes the loss, learns nothing"
)
FROZEN_LR = OptimizerSpec(
    name="kd_frozen_lr", factory=_build("FrozenLrSGD"), summary="ignores the scheduled lr"
)
COUNTER_NOT_SAVED = OptimizerSpec(
    name="kd_counter_not_saved", factory=_build("CountingSGD"), summary="step counter outside state_dict"
)
OBJECT_STATE = OptimizerSpec(
    name="kd_object_state", factory=_build("ObjectStateSGD"), summary="Python object in state"
)
GLOBAL_NORM_LAYERWISE = OptimizerSpec(
    name="kd_global_norm",
    factory=_build("GlobalNormSGD"),
    summary="global-norm SGD claiming layerwise",
    capabilities=Capabilities(layerwise=True),
)
LAST_MICRO_BATCH = OptimizerSpec(
    name="kd_last_micro_batch",
    factory=_build("LastMicroBatchSGD"),
    summary="steps on the last micro-batch's gradient, claims accumulation",
)


def _validate_typo(ctx):
    return [] if ctx.options["momentun"] < 1 else ["momentum must be < 1"]  # the typo: a KeyError


SGD_OPTIONS = (Option("momentum", float, 0.0, "momentum", low=0.0),)


def _sgd_opt(ctx):
    import torch

    return torch.optim.SGD(ctx.param_groups(), lr=ctx.lr, momentum=ctx.options["momentum"])


#: validate() crashes on every call: the refusals it should give never come
VALIDATE_CRASHES = OptimizerSpec(
    name="kd_validate_crashes",
    factory=_sgd_opt,
    summary="validate raises",
    options=SGD_OPTIONS,
    validate=_validate_typo,
)


def _fused_backward(average: bool):
    def backward(bctx):
        from kit_defects.optimizers import FusedSGD

        opt = bctx.optimizer
        while not isinstance(opt, FusedSGD):
            opt = opt.optimizer
        opt.fused_backward(bctx.loss, bctx.lr, bctx.average_gradient if average else None)

    return backward


def _fused_caps():
    return Capabilities(owns_backward=True, gradient_clipping=False, distributed=frozenset({"ddp"}))


#: claims DDP but its hooks update with the rank's own gradient (never average_gradient): ranks diverge
FUSED_NO_AVERAGE = OptimizerSpec(
    name="kd_fused_no_average",
    factory=_build("FusedSGD"),
    summary="fused-backward SGD that forgets to average across ranks",
    capabilities=_fused_caps(),
    backward=_fused_backward(average=False),
)
FUSED = OptimizerSpec(
    name="kd_fused",
    factory=_build("FusedSGD"),
    summary="fused-backward SGD (control)",
    capabilities=_fused_caps(),
    backward=_fused_backward(average=True),
)


def _refuse_small_lr(args, options) -> list[str]:
    if args.learning_rate < 0.1:
        return [f"learning_rate={args.learning_rate:g} is a no-op for this method; use learning_rate >= 0.1"]
    return []


#: correct, in the style of a plugin written for optitrainer 0.1.0 (before ``recommended_lr`` existed): its
#: validator refuses the sweep's smallest rate, 1e-3, and it learns at 0.1
LEGACY_LR_FLOOR = OptimizerSpec(
    name="kd_legacy_lr_floor",
    factory=_sgd_momentum,
    summary="SGD that refuses learning rates below 0.1, without recommended_lr (control)",
    validate_arguments=_refuse_small_lr,
)
