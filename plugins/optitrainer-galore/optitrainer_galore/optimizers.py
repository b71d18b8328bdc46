"""galore-torch's optimizers with a checkpoint made of tensors and numbers.

Upstream (galore-torch 1.0) keeps a ``GaLoreProjector`` object in the state of every projected
parameter. ``torch.save`` pickles it, but ``torch.load(..., weights_only=True)`` -- what
``transformers.Trainer`` uses to resume -- refuses to unpickle it, so a GaLore run cannot resume.

Upstream's projector also holds more memory than the method needs: the orthogonal matrix it keeps
is a slice (a view) of the whole SVD factor (``Vh[:rank]``/``U[:, :rank]``), so every projected weight
keeps the full ``min(m, n) x n`` factor alive in the optimizer state (a 768 x 768 weight at rank 128:
2.25 MiB instead of 0.375 MiB) and in every checkpoint; and ``project_back`` scales its full-size
result out of place (two weight-sized temporaries per update). :class:`LeanProjector` keeps a compact
copy of the slice, with the slice's memory order, and scales in place: same numbers, bit for bit.

The subclasses below keep upstream's update bit for bit (``GaLoreAdamW`` runs a copy of upstream's
``step`` whose one change is an ``out=`` division, see :class:`_LeanAdamWStep`), give new parameters a
:class:`LeanProjector`, and change the serialized form: ``state_dict()`` replaces the projector by its orthogonal matrix
(a tensor; a ``[left, right]`` pair for ``proj_type='full'``) under :data:`ORTHO_KEY`, and
``load_state_dict()`` rebuilds the projector from that matrix and the group's
``rank``/``update_proj_gap``/``scale``/``proj_type`` (which the checkpoint also holds). The
projector's only other attribute, ``verbose``, is unused upstream.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from galore_torch import GaLoreAdafactor as _UpstreamAdafactor
from galore_torch import GaLoreAdamW as _UpstreamAdamW
from galore_torch import GaLoreAdamW8bit as _UpstreamAdamW8bit
from galore_torch.galore_projector import GaLoreProjector

__all__ = ["ORTHO_KEY", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "LeanProjector"]

#: the state key that holds the projector's orthogonal matrix in a checkpoint
ORTHO_KEY = "galore_ortho_matrix"


def compact(matrix: torch.Tensor) -> torch.Tensor:
    """A copy of ``matrix`` that owns just its elements, in the same memory order (row- or column-major).

    Keeping the order keeps the matmuls that read it bit-identical to reading the original view.
    """
    if matrix.dim() == 2 and matrix.stride(0) == 1 and matrix.size(0) > 1:  # column-major (LAPACK's order)
        return torch.empty_strided(
            matrix.shape, (1, matrix.size(0)), dtype=matrix.dtype, device=matrix.device
        ).copy_(matrix)
    return matrix.clone(memory_format=torch.contiguous_format)


class LeanProjector(GaLoreProjector):
    """``GaLoreProjector`` that keeps only the rank-``r`` factor and scales its result in place."""

    def get_orthogonal_matrix(self, weights, rank, type):
        ortho = super().get_orthogonal_matrix(weights, rank, type)
        if isinstance(ortho, list):
            return [compact(m) for m in ortho]
        return compact(ortho)

    def project(self, full_rank_grad, iter):
        self._tall = full_rank_grad.shape[0] >= full_rank_grad.shape[1]
        return super().project(full_rank_grad, iter)

    def project_back(self, low_rank_grad, out=None):
        # the side project() used, then ``* scale`` in place instead of into a second full matrix.
        # Upstream picks the side from low_rank_grad's shape, which is the same side except for a square
        # low-rank gradient under reverse_std (rank == a wide weight's rows), where it crashes.
        # ``out``: a full-size buffer the one-matmul projections write into (the gradient, when the
        # caller frees it after the step) instead of a new weight-sized matrix.
        ortho, tall = self.ortho_matrix, getattr(self, "_tall", None)
        if tall is None:  # project() not called on this object: upstream's rule
            tall = low_rank_grad.shape[0] >= low_rank_grad.shape[1]
            if self.proj_type == "reverse_std":
                tall = low_rank_grad.shape[0] <= low_rank_grad.shape[1]
        if self.proj_type == "full":
            full_rank_grad = torch.matmul(ortho[0], low_rank_grad) @ ortho[1]
        elif self.proj_type == "right" or (self.proj_type == "std" and tall):
            full_rank_grad = _matmul(low_rank_grad, ortho, out)
        elif self.proj_type == "reverse_std" and not tall:
            full_rank_grad = _matmul(low_rank_grad, ortho, out)
        elif self.proj_type in ("left", "std", "reverse_std"):
            full_rank_grad = _matmul(ortho, low_rank_grad, out)
        else:
            return super().project_back(low_rank_grad)
        return full_rank_grad.mul_(self.scale)


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``a @ b``, written into ``out`` when it has the product's shape, dtype and (contiguous) layout."""
    if (
        out is not None
        and a.dim() == b.dim() == 2
        and out.shape == (a.shape[0], b.shape[1])
        and out.dtype == torch.result_type(a, b)
        and out.device == a.device
        and out.is_contiguous()
    ):
        return torch.mm(a, b, out=out)
    return torch.matmul(a, b)


def _projector(group: dict[str, Any]) -> LeanProjector:
    return LeanProjector(
        group["rank"],
        update_proj_gap=group["update_proj_gap"],
        scale=group["scale"],
        proj_type=group["proj_type"],
    )


class _PlainProjectorState:
    """Mixin: lean projectors; serialize ``state['projector']`` as its orthogonal matrix, rebuild it on load."""

    @torch.no_grad()
    def step(self, closure=None):
        # upstream creates a GaLoreProjector for a parameter without one: hand it the lean one first
        for group in self.param_groups:
            if "rank" not in group:
                continue
            for p in group["params"]:
                if p.grad is not None and "projector" not in self.state[p]:
                    self.state[p]["projector"] = _projector(group)
        return super().step(closure)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        state = {}
        for key, param_state in sd["state"].items():
            if isinstance(param_state, dict) and "projector" in param_state:
                # torch's state_dict shares the live per-parameter dicts: copy before editing
                param_state = dict(param_state)
                projector = param_state.pop("projector")
                param_state[ORTHO_KEY] = projector.ortho_matrix
            state[key] = param_state
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        super().load_state_dict(state_dict, *args, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                param_state = self.state.get(p)
                if not param_state or ORTHO_KEY not in param_state:
                    continue
                projector = _projector(group)
                projector.ortho_matrix = param_state.pop(ORTHO_KEY)
                param_state["projector"] = projector


class _LeanAdamWStep:
    """galore-torch 1.0's ``GaLoreAdamW.step``, arithmetic unchanged, at most one weight-sized temporary.

    Upstream computes ``exp_avg / denom`` into a new tensor while ``denom`` is alive: for a weight it
    does not project (embeddings) that is two weight-sized temporaries; here the quotient overwrites
    ``denom`` (``out=``), bit for bit the same values. With ``gradient_is_scratch`` (the layerwise
    engine frees each gradient after its step) a projected weight's full-size update is written over
    its gradient, which the projection has consumed: no weight-sized temporary.
    """

    gradient_is_scratch = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(
                        "Adam does not support sparse gradients, please consider SparseAdam instead"
                    )
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                if "rank" in group:
                    if "projector" not in state:
                        state["projector"] = _projector(group)
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
                norm_grad = torch.div(exp_avg, denom, out=denom)
                if "rank" in group:
                    scratch = p.grad if self.gradient_is_scratch else None
                    norm_grad = state["projector"].project_back(norm_grad, out=scratch)
                p.add_(norm_grad, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))
        return loss


class _LeanAdafactorStep:
    """galore-torch 1.0's ``GaLoreAdafactor.step``, arithmetic unchanged, at most one weight-sized temporary.

    Upstream holds ``grad**2 + eps`` and then a new ``row x col`` estimate (two weight-sized tensors),
    projects back into a new matrix and adds ``-update`` (a negated copy). Here the square is built in
    place (``square().add_()``), the estimate written over it (``out=``), the update subtracted
    (``a - b`` is ``a + (-b)`` exactly) and, with ``gradient_is_scratch``, a projected weight's full-size
    update written over its consumed gradient: the same values, bit for bit.
    """

    gradient_is_scratch = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.dtype in {torch.float16, torch.bfloat16}:
                    grad = grad.float()
                if grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients.")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                if "rank" in group:
                    if "projector" not in state:
                        state["projector"] = _projector(group)
                    grad = state["projector"].project(grad, state["step"])
                grad_shape = grad.shape
                factored, use_first_moment = self._get_options(group, grad_shape)
                if "RMS" not in state:
                    state["step"] = 0
                    if use_first_moment:
                        state["exp_avg"] = torch.zeros_like(grad)
                    if factored:
                        state["exp_avg_sq_row"] = torch.zeros(grad_shape[:-1]).to(grad)
                        state["exp_avg_sq_col"] = torch.zeros(grad_shape[:-2] + grad_shape[-1:]).to(grad)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["RMS"] = 0
                else:
                    if use_first_moment:
                        state["exp_avg"] = state["exp_avg"].to(grad)
                    if factored:
                        state["exp_avg_sq_row"] = state["exp_avg_sq_row"].to(grad)
                        state["exp_avg_sq_col"] = state["exp_avg_sq_col"].to(grad)
                    else:
                        state["exp_avg_sq"] = state["exp_avg_sq"].to(grad)
                p_data_fp32 = p
                if p.dtype in {torch.float16, torch.bfloat16}:
                    p_data_fp32 = p_data_fp32.float()
                state["step"] += 1
                state["RMS"] = self._rms(p_data_fp32)
                lr = self._get_lr(group, state)
                beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
                update = grad.square().add_(group["eps"][0])  # upstream: (grad**2) + eps
                if factored:
                    exp_avg_sq_row = state["exp_avg_sq_row"]
                    exp_avg_sq_col = state["exp_avg_sq_col"]
                    exp_avg_sq_row.mul_(beta2t).add_(update.mean(dim=-1), alpha=(1.0 - beta2t))
                    exp_avg_sq_col.mul_(beta2t).add_(update.mean(dim=-2), alpha=(1.0 - beta2t))
                    # upstream's _approx_sq_grad, its product written over the squared gradient
                    r_factor = (
                        (exp_avg_sq_row / exp_avg_sq_row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                    )
                    c_factor = exp_avg_sq_col.unsqueeze(-2).rsqrt()
                    update = torch.mul(r_factor, c_factor, out=update)
                    update.mul_(grad)
                else:
                    exp_avg_sq = state["exp_avg_sq"]
                    exp_avg_sq.mul_(beta2t).add_(update, alpha=(1.0 - beta2t))
                    update = exp_avg_sq.rsqrt().mul_(grad)
                update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
                update.mul_(lr)
                if use_first_moment:
                    exp_avg = state["exp_avg"]
                    exp_avg.mul_(group["beta1"]).add_(update, alpha=(1 - group["beta1"]))
                    update = exp_avg
                if "rank" in group:
                    scratch = p.grad if self.gradient_is_scratch else None
                    update = state["projector"].project_back(update, out=scratch)
                if group["weight_decay"] != 0:
                    p_data_fp32.add_(p_data_fp32, alpha=(-group["weight_decay"] * lr))
                p_data_fp32.sub_(update)  # upstream: add_(-update)
                if p.dtype in {torch.float16, torch.bfloat16}:
                    p.copy_(p_data_fp32)
        return loss


class GaLoreAdamW(_PlainProjectorState, _LeanAdamWStep, _UpstreamAdamW):
    """``galore_torch.GaLoreAdamW`` whose checkpoint loads with ``weights_only=True``."""

    def __init__(self, params, gradient_is_scratch: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("no_deprecation_warning", True)  # upstream warns once per instance otherwise
        super().__init__(params, **kwargs)
        self.gradient_is_scratch = gradient_is_scratch


class GaLoreAdafactor(_PlainProjectorState, _LeanAdafactorStep, _UpstreamAdafactor):
    """``galore_torch.GaLoreAdafactor`` whose checkpoint loads with ``weights_only=True``."""

    def __init__(self, params, gradient_is_scratch: bool = False, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.gradient_is_scratch = gradient_is_scratch


class GaLoreAdamW8bit(_PlainProjectorState, _UpstreamAdamW8bit):
    """``galore_torch.GaLoreAdamW8bit`` whose checkpoint loads with ``weights_only=True``.

    Its step calls ``torch.cuda.synchronize()`` (upstream): it needs a CUDA device.
    """
