"""optitrainer plugin for torch-optimi (``import optimi``): StableAdamW and optimi's other optimizers.

Names: ``stable_adamw`` (the name transformers knows), ``optimi_adamw``, ``optimi_radam``,
``optimi_lion`` (alias ``lion``), ``optimi_adan`` (alias ``adan``), ``optimi_ranger`` (alias
``ranger``). Every one is element-wise, so every one also runs as
``<name>_layerwise`` through optitrainer's layerwise engine.

What the factories hand the trainer is optimi's own class, built as a plain optimizer over the
trainer's decay / no-decay groups: ``gradient_release=False`` (the core's layerwise engine steps
each parameter itself) and optimi's default kernel choice (Triton on a CUDA device when Triton is
installed, else the for-loop implementation; on CPU always the for-loop one).

This module imports neither torch nor optimi: ``optitrainer list`` loads it.
"""

from __future__ import annotations

import warnings
from typing import Any

from optitrainer.plugin import BuildContext, Capabilities, OptimizerSpec, Option

__all__ = [
    "STABLE_ADAMW",
    "OPTIMI_ADAMW",
    "OPTIMI_RADAM",
    "OPTIMI_LION",
    "OPTIMI_ADAN",
    "OPTIMI_RANGER",
    "SPECS",
]

REQUIRES = ("torch-optimi>=0.3.3,<0.4",)
IMPORTS = ("optimi",)
LOW_PRECISION = ("torch.float16", "torch.bfloat16")
#: DDP holds whole tensors on every rank (tested); ZeRO's flattened partitions and FSDP shards are not
#: verified for optimi's fused (foreach/Triton) kernels and its Kahan-summation buffers
VERIFIED_ENGINES = Capabilities(
    layerwise=True,
    distributed=frozenset({"ddp"}),
    distributed_note="optimi's kernels and Kahan-summation buffers are verified on whole tensors (DDP), "
    "not yet on ZeRO partitions or FSDP shards",
)

# --- options shared by every optimi optimizer ------------------------------------------------------

DECOUPLE_LR = Option(
    "decouple_lr",
    bool,
    False,
    "fully decoupled weight decay: each step multiplies the weights by 1 - (lr / max_lr) * weight_decay, "
    "so weight_decay is the per-step decay at the peak learning rate (use ~1e-5..1e-4, not 0.01..0.1); "
    "False: the usual decoupled decay 1 - lr * weight_decay",
)
MAX_LR = Option(
    "max_lr",
    float,
    None,
    "peak of the learning-rate schedule, used only with decouple_lr=True; None: the training "
    "arguments' learning_rate (the peak of every transformers schedule)",
    low=0.0,
)


def _kahan(default: bool | None) -> Option:
    return Option(
        "kahan_sum",
        bool,
        default,
        "Kahan-compensated weight updates; acts only on float16/bfloat16 weights (not on float32 weights "
        "trained with bf16=True/fp16=True autocast)"
        + ("; None: on for low-precision weights" if default is None else ""),
    )


COMMON = (DECOUPLE_LR, MAX_LR, _kahan(None))

# --- building ---------------------------------------------------------------------------------------


def _build(cls_name: str, *, betas: str, eps: bool, keys: tuple[str, ...]):
    """A factory for ``optimi.<cls_name>``.

    ``betas``: ``"args"`` takes ``(adam_beta1, adam_beta2)`` from the training arguments,
    ``"option"`` the ``betas`` option. ``eps``: pass ``adam_epsilon``.
    ``keys``: option names passed through unchanged.
    """

    def factory(ctx: BuildContext):
        import optimi

        o = ctx.options
        kwargs: dict[str, Any] = {"lr": ctx.lr}
        if betas == "args":
            kwargs["betas"] = (ctx.args.adam_beta1, ctx.args.adam_beta2)
        else:
            kwargs["betas"] = tuple(o["betas"])
        if eps:
            kwargs["eps"] = ctx.args.adam_epsilon
        # the group value wins (0.0 for biases and norms); this is the default for other groups
        kwargs["weight_decay"] = ctx.weight_decay
        kwargs.update({k: o[k] for k in keys})
        kwargs.update(decouple_lr=o["decouple_lr"], max_lr=o["max_lr"], kahan_sum=o["kahan_sum"])
        # the core's layerwise engine steps each parameter from its own hook: a plain optimizer here
        kwargs["gradient_release"] = False
        groups = ctx.param_groups()
        kwargs["triton"] = _triton_for([p for g in groups for p in g["params"]])
        optimizer = getattr(optimi, cls_name)(groups, **kwargs)
        optimizer.register_load_state_dict_post_hook(_kernels_for_this_device)
        return optimizer

    return factory


def _triton_for(params: list) -> bool:
    """optimi's own rule for its Triton kernels, applied to the parameters they would run on.

    optimi 0.3.3 decides ``triton=None`` in its first step from the list of parameters it has collected
    so far -- still empty, and ``all([])`` is true -- so wherever Triton is importable (every CUDA build
    of torch) it runs Triton kernels on CPU tensors and crashes ("0 active drivers"). Deciding here, on
    the real parameters, keeps the kernels optimi meant: Triton on a bf16-capable GPU, its for-each or
    per-tensor path elsewhere (the same numbers as an installation without Triton).
    """
    from optimi.utils import _default_to_triton

    return bool(params) and _default_to_triton(params)


def _kernels_for_this_device(optimizer) -> None:
    """After loading a checkpoint: Triton kernels only where this machine can run them.

    optimi decides ``triton`` once per param group and stores the decision in the group, so a
    checkpoint written on a CUDA machine with Triton says ``triton=True``; resumed on a machine
    without Triton (or on CPU), optimi's step would call kernels that do not exist there. Groups
    keep Triton only if every parameter is on a CUDA/XPU device and Triton is importable.
    """
    from optimi.utils import HAS_TRITON

    for group in optimizer.param_groups:
        if group.get("triton"):
            on_gpu = all(p.is_cuda or getattr(p, "is_xpu", False) for p in group["params"])
            if not (HAS_TRITON and on_gpu):
                group["triton"] = False


def _validate(betas: str):
    def validate(ctx: BuildContext) -> list[str]:
        o, name, problems = ctx.options, ctx.name, []
        if o["max_lr"] is not None and not o["decouple_lr"]:
            problems.append(
                f"optim_args max_lr={o['max_lr']!r}: {name} reads max_lr only for fully decoupled weight decay; "
                "add decouple_lr=True to optim_args, or remove max_lr (note: transformers.Trainer reads any "
                "decouple_lr string, even 'False', as True)"
            )
        if betas == "args":
            for key in ("adam_beta1", "adam_beta2"):
                value = getattr(ctx.args, key)
                if not 0.0 <= value < 1.0:
                    problems.append(f"{key}={value!r}: {name} needs 0 <= {key} < 1; set {key} inside [0, 1)")
        elif any(not 0.0 <= b < 1.0 for b in o["betas"]):
            problems.append(
                f"optim_args betas={tuple(o['betas'])!r}: {name} needs every beta in [0, 1); "
                "e.g. optim_args='betas=(0.98,0.92,0.99)'"
            )
        if o["kahan_sum"]:
            dtypes = {str(p.dtype) for _, p in ctx.named_parameters()}
            if not dtypes & set(LOW_PRECISION):
                warnings.warn(
                    f"{name}: kahan_sum=True does nothing here: every trainable weight is "
                    f"{', '.join(sorted(dtypes))}, and Kahan summation acts only on float16/bfloat16 weights "
                    "(bf16=True/fp16=True keep float32 weights). Load the model in bfloat16 to use it, or "
                    "drop kahan_sum.",
                    UserWarning,
                    stacklevel=2,
                )
        return problems

    return validate


_DOC_COMMON = (
    "\n\nHyperparameters from the training arguments: `learning_rate` (and its schedule), `weight_decay` "
    "(not on biases and norms){extra}. The upstream class is built with `gradient_release=False`; the "
    "layerwise mode (`{name}_layerwise`) is optitrainer's own engine, which steps one optimizer per "
    "parameter from a gradient hook with the scheduled learning rate (optimi's `gradient_release` and "
    "`optimizer_accumulation` are not used; gradient accumulation works in both modes)."
    "\n\nKahan summation (`kahan_sum`) only acts when the weights themselves are float16/bfloat16 (a model "
    "loaded with `torch_dtype=torch.bfloat16`, or `optimi.to_low_precision(model)`); with `bf16=True` the "
    "trainer keeps float32 weights and Kahan summation does nothing."
)

_ARGS_BETAS = ", `adam_beta1`/`adam_beta2` (betas)"
_ARGS_EPS = ", `adam_epsilon` (eps)"

# --- the specs --------------------------------------------------------------------------------------

STABLE_ADAMW = OptimizerSpec(
    name="stable_adamw",
    factory=_build("StableAdamW", betas="args", eps=True, keys=()),
    summary="optimi.StableAdamW: AdamW with AdaFactor's per-tensor update clipping (no gradient clipping needed)",
    requires=REQUIRES,
    imports=IMPORTS,
    options=COMMON,
    aliases=("optimi_stable_adamw",),
    # update clipping uses each tensor's RMS: under FSDP/ZeRO the optimizer sees shards or flattened
    # partitions, so the RMS (hence the update) would differ from the unsharded algorithm
    capabilities=Capabilities(
        layerwise=True,
        distributed=frozenset({"ddp"}),
        distributed_note="its update clipping uses each tensor's RMS, which differs on ZeRO partitions and FSDP shards",
    ),
    transformers_name="stable_adamw",
    validate=_validate("args"),
    docs=(
        "StableAdamW (Wortsman et al. 2023, https://arxiv.org/abs/2304.13013) scales each tensor's "
        "learning rate down by max(1, RMS(g^2 / v)) — AdaFactor's update clipping inside AdamW — which "
        "replaces gradient clipping. If the loss still spikes, lower adam_beta2 into [0.95, 0.99]. "
        "Distributed: DDP only (the per-tensor RMS is wrong on FSDP/DeepSpeed shards)."
        + _DOC_COMMON.format(extra=_ARGS_BETAS + _ARGS_EPS, name="stable_adamw")
    ),
)

OPTIMI_ADAMW = OptimizerSpec(
    name="optimi_adamw",
    factory=_build("AdamW", betas="args", eps=True, keys=()),
    summary="optimi.AdamW: AdamW with Kahan summation for bf16 weights and optional fully decoupled decay",
    requires=REQUIRES,
    imports=IMPORTS,
    options=COMMON,
    capabilities=VERIFIED_ENGINES,
    validate=_validate("args"),
    docs=(
        "optimi's AdamW: decoupled weight decay (lr * weight_decay), optional fully decoupled decay "
        "(decouple_lr) and Kahan summation for low-precision weights."
        + _DOC_COMMON.format(extra=_ARGS_BETAS + _ARGS_EPS, name="optimi_adamw")
    ),
)

DECOUPLE_WD_RADAM = Option(
    "decouple_wd",
    bool,
    False,
    "decoupled weight decay (lr * weight_decay on the weights, AdamW-style); False: L2 penalty added "
    "to the gradient",
)

OPTIMI_RADAM = OptimizerSpec(
    name="optimi_radam",
    factory=_build("RAdam", betas="args", eps=True, keys=("decouple_wd",)),
    summary="optimi.RAdam: rectified Adam (no warmup needed) with Kahan summation for bf16 weights",
    requires=REQUIRES,
    imports=IMPORTS,
    options=(DECOUPLE_WD_RADAM, *COMMON),
    capabilities=VERIFIED_ENGINES,
    validate=_validate("args"),
    docs=(
        "RAdam (Liu et al. 2019): Adam with a rectified adaptive learning rate, which needs no warmup; its "
        "first steps are momentum-SGD steps while the variance estimate is unreliable. Weight decay is an L2 "
        "penalty unless decouple_wd=True."
        + _DOC_COMMON.format(extra=_ARGS_BETAS + _ARGS_EPS, name="optimi_radam")
    ),
)

OPTIMI_LION = OptimizerSpec(
    name="optimi_lion",
    factory=_build("Lion", betas="args", eps=False, keys=()),
    summary="optimi.Lion: sign-of-momentum updates, one state tensor (use a 3-10x smaller learning rate than AdamW)",
    requires=REQUIRES,
    imports=IMPORTS,
    options=COMMON,
    aliases=("lion",),
    capabilities=VERIFIED_ENGINES,
    validate=_validate("args"),
    docs=(
        "Lion (Chen et al. 2023). betas come from adam_beta1/adam_beta2 as for transformers' lion_32bit: "
        "beta1 interpolates the update, beta2 is the momentum average; the paper uses (0.9, 0.99), so set "
        "adam_beta2=0.99. Use a 3-10x smaller learning rate and a 3-10x larger weight_decay than AdamW."
        + _DOC_COMMON.format(extra=_ARGS_BETAS, name="optimi_lion")
    ),
)

OPTIMI_ADAN = OptimizerSpec(
    name="optimi_adan",
    factory=_build("Adan", betas="option", eps=True, keys=("adam_wd",)),
    summary="optimi.Adan: adaptive Nesterov momentum (three moving averages)",
    requires=REQUIRES,
    imports=IMPORTS,
    options=(
        Option(
            "betas",
            tuple,
            (0.98, 0.92, 0.99),
            "coefficients of the gradient, gradient-difference and squared-gradient moving averages "
            "(Adan has three, so adam_beta1/adam_beta2 are not used)",
        ),
        Option(
            "adam_wd",
            bool,
            False,
            "apply weight decay before the update (Adam-style) instead of after it (the Adan paper); "
            "forced off by optimi when Kahan summation is on",
        ),
        DECOUPLE_LR,
        MAX_LR,
        # optimi's Adan defaults to False (its docstring says None); kept as upstream builds it
        _kahan(False),
    ),
    aliases=("adan",),
    capabilities=VERIFIED_ENGINES,
    validate=_validate("option"),
    docs=(
        "Adan (Xie et al. 2022). Keeps the previous gradient in its state. Kahan summation is off by "
        "default here, as in optimi's Adan (unlike optimi's other optimizers): pass kahan_sum=True for "
        "bfloat16 weights." + _DOC_COMMON.format(extra=_ARGS_EPS, name="optimi_adan")
    ),
)

OPTIMI_RANGER = OptimizerSpec(
    name="optimi_ranger",
    factory=_build("Ranger", betas="args", eps=True, keys=("k", "alpha", "decouple_wd")),
    summary="optimi.Ranger: RAdam + Lookahead",
    requires=REQUIRES,
    imports=IMPORTS,
    options=(
        Option("k", int, 6, "Lookahead synchronization period (steps)", low=1),
        Option(
            "alpha",
            float,
            0.5,
            "Lookahead interpolation: every k steps the slow weights move this fraction toward the fast ones, then the fast weights are reset to them",
            low=0.0,
            high=1.0,
        ),
        Option(
            "decouple_wd",
            bool,
            True,
            "decoupled weight decay (lr * weight_decay on the weights); False: L2 penalty added to the gradient",
        ),
        *COMMON,
    ),
    aliases=("ranger",),
    capabilities=VERIFIED_ENGINES,
    validate=_validate("args"),
    docs=(
        "Ranger: RAdam with Lookahead. Every k steps the slow copy of the weights (kept in the state, as "
        "much memory as the weights) moves alpha of the way toward the fast weights, and the fast weights "
        "are reset to it." + _DOC_COMMON.format(extra=_ARGS_BETAS + _ARGS_EPS, name="optimi_ranger")
    ),
)

#: every spec of this distribution, by canonical name
SPECS = {
    s.name: s
    for s in (
        STABLE_ADAMW,
        OPTIMI_ADAMW,
        OPTIMI_RADAM,
        OPTIMI_LION,
        OPTIMI_ADAN,
        OPTIMI_RANGER,
    )
}
