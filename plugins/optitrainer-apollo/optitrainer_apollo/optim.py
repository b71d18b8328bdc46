"""``APOLLOAdamW``: apollo-torch's optimizer with resumable state and explicit projection seeds.

Upstream (``apollo_torch.APOLLOAdamW``, 1.0.3) keeps one projector *object* per projected weight in
``optimizer.state`` (``state[p]["projector"]``): a ``GradientProjector`` (random projection) or a
``GaLoreProjector`` (SVD). ``torch.save`` pickles it, but ``torch.load(..., weights_only=True)`` --
which is how ``transformers.Trainer`` reloads a checkpoint -- refuses it, so training cannot resume.

This subclass runs upstream's update arithmetic unchanged (a copy of its ``step`` whose one change is
an in-place division, so one weight-sized temporary lives at a time instead of two; the parity tests
compare it with upstream bit for bit). Between
steps it keeps each projector as a plain dict of its *changing* fields -- the orthogonal matrix (a
tensor), the next projection seed and the refresh count (ints) -- and rebuilds the projector object
from that dict and the group's hyperparameters just for the duration of ``step``. So
``optimizer.state`` and ``state_dict()`` hold only tensors and numbers, load with
``weights_only=True``, and a resumed run draws exactly the projections the uninterrupted one draws.
(Strings are deliberately kept out of the per-parameter state: ``Optimizer.load_state_dict`` rebuilds
any iterable value with ``type(value)(generator)``, which turns a string into garbage; the string
hyperparameters live in the param groups, which it restores as they were.)

A closure passed to ``step`` is evaluated with gradients enabled, as torch's optimizers do (upstream
evaluates it under ``torch.no_grad()``, so a closure that calls ``backward()`` fails).

Projection seeds: upstream seeds parameter ``p``'s random projection with ``p``'s 1-based position in
the flattened param groups of *its* optimizer. ``seeds=`` sets them explicitly, so one optimizer per
parameter (layerwise) can draw the very projections of the one-optimizer form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from apollo_torch import APOLLOAdamW as _UpstreamAPOLLOAdamW

__all__ = ["APOLLOAdamW", "PROJECTOR_FIELDS"]

#: the projector attributes that change during training (everything else comes from the param group)
PROJECTOR_FIELDS = ("ortho_matrix", "seed", "svd_count")


class APOLLOAdamW(_UpstreamAPOLLOAdamW):
    """``apollo_torch.APOLLOAdamW`` whose state is plain tensors and numbers.

    Args:
        params: parameters or param groups; groups with a ``rank`` key are projected (APOLLO), the
            others get upstream's plain AdamW update. Projected groups also need ``proj``,
            ``scale_type``, ``scale``, ``update_proj_gap`` and ``proj_type``.
        seeds: the projection seed of each parameter, in the order of the flattened param groups
            (``None``: upstream's seeds, the 1-based positions).
        gradient_is_scratch: the caller frees each gradient right after the step (the layerwise
            engine), so the update may scale the gradient in place instead of into a weight-sized copy.
        **kwargs: upstream's (``lr``, ``betas``, ``eps``, ``weight_decay``, ``correct_bias``,
            ``scale_front``, ``disable_nl``).
    """

    def __init__(
        self,
        params,
        *,
        seeds: Sequence[int] | None = None,
        gradient_is_scratch: bool = False,
        **kwargs: Any,
    ):
        super().__init__(params, **kwargs)
        self.gradient_is_scratch = gradient_is_scratch
        if seeds is not None:
            flat = [p for g in self.param_groups for p in g["params"]]
            if len(seeds) != len(flat):
                raise ValueError(f"seeds has {len(seeds)} entries for {len(flat)} parameters")
            for p, seed in zip(flat, seeds):
                if p.requires_grad:  # upstream seeds only trainable parameters
                    self.state[p]["seed"] = int(seed)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:  # upstream calls it under no_grad, where its backward cannot run
            with torch.enable_grad():
                loss = closure()
        self._inflate_projectors()
        try:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._update(group, p)
        finally:
            self._deflate_projectors()
        return loss

    def _update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        """Upstream's update of one parameter (apollo-torch 1.0.3), arithmetic unchanged.

        Only the memory differs: upstream divides the weight-sized scaled gradient by the norm limiter,
        and the first moment by the denominator, out of place (two weight-sized temporaries live at
        once); here both divisions write over their temporary, and with ``gradient_is_scratch`` the
        scaled gradient is the gradient itself (no weight-sized temporary at all).
        """
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        if "rank" in group:
            norm_dim = 0 if grad.shape[0] < grad.shape[1] else 1  # the low-rank dimension
            if "projector" not in state:
                state["projector"] = self._initialize_projector(group, state)
            grad = state["projector"].project(grad, state["step"])
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=(1.0 - beta1))
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            bias_correction1 = 1.0 - beta1 ** state["step"]
            bias_correction2 = 1.0 - beta2 ** state["step"]
            step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
        norm_grad = torch.div(exp_avg, denom, out=denom)  # upstream: exp_avg / denom, a second temporary
        if "rank" in group:
            if group["scale_type"] == "channel":
                grad_scaling_factor = torch.norm(norm_grad, dim=norm_dim) / (
                    torch.norm(grad, dim=norm_dim) + 1e-8
                )
                if norm_dim == 1:
                    grad_scaling_factor = grad_scaling_factor.unsqueeze(1)
            elif group["scale_type"] == "tensor":
                grad_scaling_factor = torch.norm(norm_grad) / (torch.norm(grad) + 1e-8)
            if self.gradient_is_scratch and torch.result_type(p.grad, grad_scaling_factor) == p.grad.dtype:
                # the same product, written over the gradient it reads
                scaled_grad = p.grad.mul_(grad_scaling_factor)
            else:
                scaled_grad = p.grad * grad_scaling_factor
            if self.scale_front:
                scaled_grad *= np.sqrt(group["scale"])
            if not self.disable_nl:
                if "scaled_grad" in state:
                    scaled_grad_norm = torch.norm(scaled_grad)
                    limiter = max(scaled_grad_norm / (state["scaled_grad"] + 1e-8), 1.01) / 1.01
                    scaled_grad.div_(limiter)  # upstream: scaled_grad = scaled_grad / limiter
                    state["scaled_grad"] = scaled_grad_norm / limiter
                else:
                    state["scaled_grad"] = torch.norm(scaled_grad)
            norm_grad = scaled_grad
            if not self.scale_front:
                norm_grad *= np.sqrt(group["scale"])
        p.add_(norm_grad, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))

    # projector objects <-> plain dicts ---------------------------------------------------------------
    def _projected(self):
        for group in self.param_groups:
            if "rank" in group:
                for p in group["params"]:
                    yield group, p

    def _inflate_projectors(self) -> None:
        """Plain dicts -> upstream projector objects, built from the group's hyperparameters."""
        for group, p in self._projected():
            state = self.state.get(p)
            saved = state.get("projector") if state else None
            if isinstance(saved, dict):
                projector = self._initialize_projector(group, state)
                for key, value in saved.items():
                    setattr(projector, key, value)
                state["projector"] = projector

    def _deflate_projectors(self) -> None:
        """Upstream projector objects -> plain dicts of their changing fields."""
        for _, p in self._projected():
            state = self.state.get(p)
            projector = state.get("projector") if state else None
            if projector is not None and not isinstance(projector, dict):
                fields = {k: getattr(projector, k) for k in PROJECTOR_FIELDS if hasattr(projector, k)}
                if isinstance(fields.get("ortho_matrix"), torch.Tensor):
                    # the SVD projector keeps a view of the whole SVD factor: keep just the rank-r slice
                    fields["ortho_matrix"] = _compact(fields["ortho_matrix"])
                state["projector"] = fields


def _compact(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` itself when it owns just its elements, else a copy in the same (row/column-major) order."""
    if matrix.untyped_storage().nbytes() == matrix.numel() * matrix.element_size():
        return matrix
    if matrix.dim() == 2 and matrix.stride(0) == 1 and matrix.size(0) > 1:  # column-major (LAPACK's order)
        out = torch.empty_strided(matrix.shape, (1, matrix.size(0)), dtype=matrix.dtype, device=matrix.device)
        return out.copy_(matrix)
    return matrix.clone(memory_format=torch.contiguous_format)
