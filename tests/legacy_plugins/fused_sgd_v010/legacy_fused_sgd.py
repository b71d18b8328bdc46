"""A fused-backward SGD plugin as written for optitrainer 0.1.0 (kept unchanged: see ../README.md).

Each parameter is updated by plain SGD in its post-accumulate-grad hook, as soon as its gradient is ready,
and the gradient is freed at once. Under DDP every hook averages its gradient first with
``BackwardContext.average_gradient`` (one all-reduce per gradient: what 0.1.0 offered).
"""

from optitrainer.plugin import BackwardContext, BuildContext, Capabilities, OptimizerSpec


def _build(ctx: BuildContext):
    import torch

    # holds the parameter groups (decayed / not decayed) and the scheduled lr; never stepped
    return torch.optim.SGD(ctx.param_groups(), lr=ctx.lr)


def _backward(bctx: BackwardContext) -> float | None:
    import torch

    lr = bctx.lr
    norms = []

    def hook_for(weight_decay: float):
        def hook(param):
            grad = param.grad
            bctx.average_gradient(grad)
            with torch.no_grad():
                norms.append(torch.linalg.vector_norm(grad, 2.0))
                if weight_decay != 0:
                    grad = grad.add(param, alpha=weight_decay)  # as torch.optim.SGD
                param.add_(grad, alpha=-lr)
            param.grad = None

        return hook

    handles = []
    for group in bctx.optimizer.param_groups:
        hook = hook_for(group["weight_decay"])
        handles += [p.register_post_accumulate_grad_hook(hook) for p in group["params"] if p.requires_grad]
    try:
        bctx.loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    # the norm of the gradients it stepped on (measured, never used to clip)
    return float(torch.linalg.vector_norm(torch.stack(norms), 2.0)) if norms else None


LEGACY_FUSED_SGD = OptimizerSpec(
    name="legacy_fused_sgd",
    factory=_build,
    summary="SGD fused into the backward pass (a plugin written for optitrainer 0.1.0)",
    imports=("torch",),
    capabilities=Capabilities(
        owns_backward=True,
        gradient_accumulation=False,
        gradient_clipping=False,  # each parameter is updated before the global norm is known
        fp16=False,
        distributed=frozenset({"ddp"}),
        distributed_note=(
            "its updates run in gradient hooks that average each gradient across DDP ranks; DeepSpeed and "
            "FSDP reduce the gradients after those hooks"
        ),
    ),
    backward=_backward,
)
