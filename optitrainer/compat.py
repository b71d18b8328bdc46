"""The one up-front compatibility check: capability flags against the training setup.

Every conflict is collected and reported at once, before any training step, each with its fix.
"""

from __future__ import annotations

from typing import Any

from .engine import Engine, engine_from_arguments
from .errors import IncompatibleConfigError
from .options import parse_optim_args
from .plugin import ENGINE_MODES
from .registry import ResolvedOptimizer

#: Engines under which the layerwise engine steps on the rank-averaged gradient: under DDP it averages
#: each gradient in its hook; FSDP2 calls the hooks with the reduce-scattered shard. DeepSpeed owns the
#: gradients (its own buckets and partitions) and FSDP1 hooks see the unreduced flat parameter.
LAYERWISE_ENGINES = frozenset({"ddp", "fsdp2"})


def supported_engines(resolved: ResolvedOptimizer) -> frozenset[str]:
    """The engine keys (``"ddp"``, ``"zero2"``, ``"fsdp2"``…) ``resolved`` trains correctly under."""
    engines = resolved.spec.capabilities.engines
    return engines & LAYERWISE_ENGINES if resolved.layerwise else engines


def describe_engines(engines: frozenset[str]) -> str:
    """``"DDP, DeepSpeed ZeRO-1/2, FSDP2"``: engine keys for people."""
    parts = ["DDP"] if "ddp" in engines else []
    stages = [m[-1] for m in ENGINE_MODES if m.startswith("zero") and m in engines]
    if stages:
        parts.append("DeepSpeed ZeRO-" + "/".join(stages))
    versions = [m[-1] for m in ENGINE_MODES if m.startswith("fsdp") and m in engines]
    if versions:
        parts.append("FSDP" + "/".join(versions))
    return ", ".join(parts) or "no distributed engine"


def engine_refusal_reason(resolved: ResolvedOptimizer, engine: Engine) -> str | None:
    """Why ``resolved`` cannot train under ``engine``, or ``None`` when it trains correctly there."""
    if not engine.is_distributed or engine.mode in supported_engines(resolved):
        return None
    caps = resolved.spec.capabilities
    if resolved.layerwise and engine.mode in caps.engines:
        return "layerwise mode steps each parameter from its gradient hook, which " + (
            "DeepSpeed calls before its own gradient reduction and partitioning"
            if engine.kind == "deepspeed"
            else "FSDP1 calls on the unreduced flat parameter"
        )
    return caps.distributed_note or f"the plugin does not declare {engine} support"


def engine_conflict(resolved: ResolvedOptimizer, engine: Engine) -> str | None:
    """The refusal of ``engine`` for ``resolved`` (what, why, the fix), or ``None`` when it trains there."""
    why = engine_refusal_reason(resolved, engine)
    if why is None:
        return None
    engines = supported_engines(resolved)
    fix = f"launch with {describe_engines(engines)}" if engines else "train on one process"
    if resolved.layerwise and engine.mode in resolved.spec.capabilities.engines:
        fix += f", or use optim={resolved.spec.name!r} (the standard form runs under {engine})"
    source = f" (from {engine.source})" if engine.source else ""
    return (
        f"{engine} training{source}: {resolved.name} supports {describe_engines(engines)} ({why}); "
        f"{fix}, or pick another optimizer"
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


#: how exact clipping gets the global norm before the first update (see :mod:`optitrainer.layerwise`)
CLIPPING_SCHEMES = ("rebuild", "hold")


def clipping_scheme(requested: str, engine_kind: str) -> str:
    """The scheme ``layerwise_clipping=requested`` runs under ``engine_kind`` (``Engine.kind``).

    ``auto`` holds under FSDP, whose held gradients are each rank's shard and whose other scheme runs the
    whole forward/backward twice; elsewhere it rebuilds, which keeps the memory bound.
    """
    if requested == "auto":
        return "hold" if engine_kind == "fsdp" else "rebuild"
    return requested


def argument_conflicts(
    resolved: ResolvedOptimizer,
    args: Any,
    engine: Engine | None = None,
    options: dict[str, Any] | None = None,
) -> list[str]:
    """Every conflict of ``resolved`` with the training setup, the plugin's own argument checks included.

    ``engine`` is the distributed engine that runs (the trainer passes the accelerator's); by default
    the one the arguments and the environment ask for. ``options`` are the parsed ``optim_args``
    (parsed from ``args`` when not given).
    """
    caps = resolved.spec.capabilities
    name = resolved.name
    ga = getattr(args, "gradient_accumulation_steps", 1)
    clip = getattr(args, "max_grad_norm", 0.0) or 0.0
    out: list[str] = []
    if caps.needs_target_modules and getattr(args, "optim_target_modules", None) is None:
        out.append(
            f"{name} projects the gradients of selected linear layers: set optim_target_modules, e.g. "
            "optim_target_modules=[r'.*.attn.*', r'.*.mlp.*'] or optim_target_modules='all-linear'"
        )
    if not caps.gradient_accumulation and ga > 1:
        out.append(
            f"gradient_accumulation_steps={ga}: {name} updates the weights inside the backward pass, so it "
            "cannot accumulate gradients; set gradient_accumulation_steps=1 and raise per_device_train_batch_size"
        )
    if not caps.gradient_clipping and clip > 0:
        out.append(f"max_grad_norm={clip}: {name} cannot clip gradients truthfully; set max_grad_norm=0")
    if resolved.layerwise and getattr(args, "fp16", False):
        out.append(
            f"fp16=True: {name} steps each parameter during backward, before fp16 loss scaling could be undone; "
            "use bf16=True or fp32"
        )
    elif not caps.fp16 and getattr(args, "fp16", False):
        out.append(f"fp16=True: {name} does not support fp16 loss scaling; use bf16=True or fp32")
    if caps.requires_cuda and (getattr(args, "use_cpu", False) or not _cuda_available()):
        out.append(
            f"{name} needs a CUDA device (its upstream step calls CUDA-only functions); none is available"
        )
    engine = engine_from_arguments(args) if engine is None else engine
    refusal = engine_conflict(resolved, engine)
    if refusal is not None:
        out.append(refusal)
    scheme = clipping_scheme(getattr(args, "layerwise_clipping", "auto"), engine.kind)
    if resolved.layerwise and clip > 0 and ga > 1 and engine.kind == "fsdp" and scheme == "rebuild":
        # the two-pass scheme runs a clipped step's forward/backward twice under FSDP2 (its hooks expect
        # one backward per forward); holding the shard gradients needs one
        out.append(
            f"max_grad_norm={clip} with gradient_accumulation_steps={ga} under FSDP: layerwise_clipping="
            "'rebuild' runs the last micro-batch twice there; use layerwise_clipping='hold' (the default "
            "under FSDP), max_grad_norm=0 or gradient_accumulation_steps=1"
        )
    validate_arguments = resolved.spec.validate_arguments
    if validate_arguments is not None and not resolved.is_transformers_fallback:
        if options is None:
            options = parse_optim_args(resolved.spec, getattr(args, "optim_args", None))
        out.extend(validate_arguments(args, options))
    return out


def check_arguments(
    resolved: ResolvedOptimizer,
    args: Any,
    engine: Engine | None = None,
    options: dict[str, Any] | None = None,
) -> None:
    raise_conflicts(resolved, argument_conflicts(resolved, args, engine, options))


def learning_rate_warning(resolved: ResolvedOptimizer, lr: float) -> str | None:
    """A warning when ``lr`` lies outside the spec's measured ``learning_rate_range``; without one, when it
    is 100 times away from the recommended learning rate, or more."""
    spec = resolved.spec
    if lr is None or lr <= 0:
        return None
    if spec.learning_rate_range is not None:
        low, high = spec.learning_rate_range
        if low <= lr <= high:
            return None
        advice = (
            f"Set learning_rate={spec.recommended_lr:g}"
            if spec.recommended_lr
            else "Set a rate in that range"
        )
        return (
            f"optim={resolved.name!r} learned only at learning_rate {low:g} to {high:g} in its plugin's "
            f"measurement ({resolved.provenance}; optitrainer check {spec.name} --measure-lr), and "
            f"learning_rate={lr:g} is {'below' if lr < low else 'above'} that: the loss may not move "
            f"{'at all' if lr < low else 'down'}. {advice} unless you know this is what you want."
        )
    recommended = spec.recommended_lr
    if recommended is None:
        return None
    ratio = lr / recommended
    if 1 / 100 < ratio < 100:
        return None
    return (
        f"optim={resolved.name!r} is meant to run at learning_rate={recommended:g} "
        f"({resolved.provenance}); learning_rate={lr:g} is {max(ratio, 1 / ratio):.0f} times "
        f"{'larger' if ratio > 1 else 'smaller'}. Set learning_rate={recommended:g} unless you know "
        "this is what you want."
    )


def raise_conflicts(resolved: ResolvedOptimizer, conflicts: list[str]) -> None:
    if conflicts:
        raise IncompatibleConfigError(
            f"optim={resolved.name!r} ({resolved.provenance}) cannot run with these settings:\n"
            + "\n".join(f"  - {c}" for c in conflicts)
        )
