"""optitrainer plugin: ``lomo`` and ``adalomo`` (lomo-optim), fused backward + update.

LOMO (https://huggingface.co/papers/2306.09782) and AdaLomo (https://hf.co/papers/2310.10195)
update each parameter inside the backward pass, as soon as its gradient is ready, and free that
gradient at once: no gradient buffers, no optimizer step. The plugin therefore owns the backward
pass (``Capabilities.owns_backward``): the trainer calls :func:`fused_backward` instead of
``accelerator.backward(loss)``, with the scheduler's current learning rate.

Under DDP the trainer keeps the model out of DDP's wrapper and hands over
``BackwardContext.average_gradient``: every hook averages its gradient across the ranks before the
norm pass measures it and before the update uses it, so all ranks clip with the same global norm and
apply the same update. DeepSpeed and FSDP are refused (see :data:`FUSED`).

This module is imported by ``optitrainer list``: it imports neither torch nor ``lomo_optim``; the
optimizer classes (:mod:`optitrainer_lomo.optim`) are imported by the factories.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from optitrainer.plugin import BackwardContext, BuildContext, Capabilities, OptimizerSpec, Option

if TYPE_CHECKING:
    import torch

__all__ = ["ADALOMO", "LOMO", "fused_backward"]

logger = logging.getLogger("optitrainer")

REQUIRES = ("lomo-optim==0.1.1",)
IMPORTS = ("lomo_optim",)

#: updates happen inside backward: no accumulation, no fp16 GradScaler; DDP through the hooks' averaging
FUSED = Capabilities(
    owns_backward=True,
    gradient_accumulation=False,
    gradient_clipping=True,  # a real global-norm clip, measured in a first backward pass
    fp16=False,
    distributed=frozenset({"ddp"}),
    distributed_note=(
        "its updates run in per-parameter gradient hooks, which average each gradient across DDP ranks; "
        "DeepSpeed owns the backward pass and reduces and partitions the gradients itself, after those "
        "hooks: with this refusal bypassed, ZeRO-3's own hook finds the gradient LOMO already consumed and "
        "freed and fails at the first backward (tests/lomo_zero3_probe.py). LOMO upstream's ZeRO-3 path, "
        "which averages each full gradient and updates the rank's slice, runs in its own trainer, outside "
        "transformers' Trainer; FSDP: not implemented"
    ),
)

CLIP_GRAD_VALUE = Option(
    "clip_grad_value",
    float,
    None,
    "clamp every gradient element to [-v, v] before the update (upstream's clip_grad_value)",
    low=0.0,
)


def _unwrap(optimizer: torch.optim.Optimizer):
    from .optim import FusedBackwardOptimizer

    seen = optimizer
    while not isinstance(seen, FusedBackwardOptimizer):
        seen = getattr(seen, "optimizer", None)  # accelerate's AcceleratedOptimizer wraps it
        if seen is None:
            raise TypeError(
                f"the LOMO backward got a {type(optimizer).__name__}; build the optimizer with optim='lomo' "
                "or optim='adalomo' (optitrainer_lomo.optim)"
            )
    return seen


def fused_backward(bctx: BackwardContext) -> float | None:
    """The trainer's backward pass for ``lomo``/``adalomo``: backward and update in one go.

    ``max_grad_norm > 0``: a first backward pass measures the global gradient norm, then every
    parameter is updated with its gradient clipped to it (rebuilt from that pass where the optimizer
    was given the model, see :mod:`optitrainer_lomo.optim`); returns the pre-clip norm.
    ``max_grad_norm == 0``: one backward pass, no norm measured, returns ``None``.
    Each hook averages its gradient across the DDP ranks first, in both passes: the norm is that of the
    averaged gradient, the same on every rank. With ``bctx.averager`` (optitrainer >= 0.2) the averaging
    runs in buckets overlapped with backward; with an older core, one ``bctx.average_gradient`` per hook.
    """
    optimizer = _unwrap(bctx.optimizer)
    return optimizer.fused_backward(
        bctx.loss,
        lr=bctx.lr,
        max_grad_norm=bctx.max_grad_norm,
        average_gradient=bctx.average_gradient,
        averager=getattr(bctx, "averager", None),
    )


def _note_clipping(ctx: BuildContext):
    """The model whose Linear/Embedding gradients exact clipping rebuilds, or ``None`` when not clipping."""
    clip = getattr(ctx.args, "max_grad_norm", 0.0) or 0.0
    if clip > 0:
        logger.info(
            "optitrainer: %s with max_grad_norm=%g clips for real: a norm pass measures the global gradient "
            "norm, then the update runs on Linear/Embedding gradients rebuilt from that pass (one matmul "
            "each) and a second backward for any other parameter; set max_grad_norm=0 for one pass",
            ctx.name,
            clip,
        )
        return ctx.model
    return None


def _validate(ctx: BuildContext) -> list[str]:
    import torch

    problems = []
    half = [n for n, p in ctx.named_parameters() if p.dtype == torch.float16]
    if half:
        problems.append(
            f"{len(half)} trainable parameters are float16 (e.g. {half[0]}): {ctx.name} here has no loss "
            "scaling, so float16 gradients may underflow or overflow; load the model in bfloat16 or float32"
        )
    return problems


def _build_lomo(ctx: BuildContext):
    from .optim import Lomo

    model = _note_clipping(ctx)
    return Lomo(ctx.param_groups(), lr=ctx.lr, clip_grad_value=ctx.options["clip_grad_value"], model=model)


def _build_adalomo(ctx: BuildContext):
    from .optim import AdaLomo

    model = _note_clipping(ctx)
    o = ctx.options
    return AdaLomo(
        ctx.param_groups(),
        lr=ctx.lr,
        loss_scale=o["loss_scale"],
        eps=o["eps"],
        clip_threshold=o["clip_threshold"],
        decay_rate=o["decay_rate"],
        clip_grad_value=o["clip_grad_value"],
        model=model,
    )


_COMMON_DOCS = """
Differences from `transformers.Trainer` (measured in the plugin's tests):

- `weight_decay` from the training arguments is applied (transformers passes none to LOMO/AdaLomo),
  on the trainer's decay group only (not on biases and norms).
- `max_grad_norm > 0` clips for real: a first backward pass measures the global gradient norm (logged
  as `grad_norm`), then the update runs with clipped gradients, Linear/Embedding ones rebuilt from that
  pass (one matmul each, the same bits), the others through a second backward. transformers never
  clips and logs `grad_norm` 0.0. `max_grad_norm=0` runs one backward pass and logs no `grad_norm`.
- `gradient_accumulation_steps > 1`, `fp16=True`, DeepSpeed and FSDP are refused before step 1
  (transformers updates after every micro-batch under accumulation).
- DDP trains: each hook averages its gradient across the ranks before the norm pass measures it and
  before the update uses it; the ranks stay bit-identical and match one process with the global batch
  up to float reordering.
- Each parameter's hook handles only that parameter (upstream's hooks walk all parameters each time).
"""

LOMO = OptimizerSpec(
    name="lomo",
    factory=_build_lomo,
    summary="LOMO: SGD fused into the backward pass, no gradient buffers (lomo-optim)",
    requires=REQUIRES,
    imports=IMPORTS,
    options=(CLIP_GRAD_VALUE,),
    capabilities=FUSED,
    transformers_name="lomo",
    validate=_validate,
    backward=fused_backward,
    docs="Low-Memory Optimization: p -= lr * grad inside the backward pass.\n" + _COMMON_DOCS,
)

ADALOMO = OptimizerSpec(
    name="adalomo",
    factory=_build_adalomo,
    summary="AdaLomo: LOMO with factored second moments (Adafactor-like), fused into backward (lomo-optim)",
    requires=REQUIRES,
    imports=IMPORTS,
    options=(
        Option(
            "loss_scale",
            float,
            1024.0,
            "static loss scale: the loss is multiplied and the gradients divided by it (0 disables)",
            low=0.0,
        ),
        Option(
            "eps",
            tuple,
            (1e-30, 1e-3),
            "(eps1,eps2): eps1 is added to squared gradients, eps2 is the smallest parameter RMS scaling the step",
        ),
        Option(
            "clip_threshold",
            float,
            1.0,
            "the update is divided by max(1, RMS(update) / clip_threshold)",
            low=0.0,
        ),
        Option("decay_rate", float, -0.8, "second-moment decay: beta2_t = 1 - t ** decay_rate", high=0.0),
        CLIP_GRAD_VALUE,
    ),
    capabilities=FUSED,
    transformers_name="adalomo",
    validate=_validate,
    backward=fused_backward,
    docs="AdaLomo: per-parameter adaptive steps from factored second moments, fused into backward. "
    "Runs on CPU (upstream allocates its statistics with .cuda()); its statistics are checkpointed.\n"
    + _COMMON_DOCS,
)
