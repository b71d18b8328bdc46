"""The one up-front compatibility check: capability flags against the training setup.

Every conflict is collected and reported at once, before any training step, each with its fix.
"""

from __future__ import annotations

from typing import Any

from .errors import IncompatibleConfigError
from .registry import ResolvedOptimizer


def distributed_mode(args: Any) -> str | None:
    """``None`` on one process, else ``"deepspeed"``, ``"fsdp"`` or ``"ddp"``."""
    if getattr(args, "deepspeed", None):
        return "deepspeed"
    if getattr(args, "fsdp", None):
        return "fsdp"
    if getattr(args, "world_size", 1) > 1:
        return "ddp"
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def argument_conflicts(resolved: ResolvedOptimizer, args: Any) -> list[str]:
    """Conflicts visible from the arguments alone."""
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
    mode = distributed_mode(args)
    if mode is not None:
        supported = caps.distributed if not resolved.layerwise else frozenset()
        if mode not in supported:
            why = (
                "layerwise mode steps each parameter inside its own backward hook"
                if resolved.layerwise
                else ""
            )
            out.append(
                f"{mode.upper()} training: {name} supports "
                + (", ".join(sorted(supported)) or "no distributed mode")
                + (f" ({why})" if why else "")
                + "; train on one process, or pick another optimizer"
            )
    if resolved.layerwise and clip > 0 and ga > 1:
        out.append(
            f"max_grad_norm={clip} with gradient_accumulation_steps={ga}: layerwise clipping needs the whole "
            "gradient before the first update; set max_grad_norm=0 or gradient_accumulation_steps=1"
        )
    return out


def check_arguments(resolved: ResolvedOptimizer, args: Any) -> None:
    raise_conflicts(resolved, argument_conflicts(resolved, args))


def raise_conflicts(resolved: ResolvedOptimizer, conflicts: list[str]) -> None:
    if conflicts:
        raise IncompatibleConfigError(
            f"optim={resolved.name!r} ({resolved.provenance}) cannot run with these settings:\n"
            + "\n".join(f"  - {c}" for c in conflicts)
        )
