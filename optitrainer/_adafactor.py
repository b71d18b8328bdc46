"""transformers' Adafactor with the same arithmetic and at most one weight-sized temporary per step."""

from __future__ import annotations

import math

import torch
from transformers.optimization import Adafactor


class LeanAdafactor(Adafactor):
    """``transformers.optimization.Adafactor`` whose ``step`` holds one weight-sized temporary, not two.

    Upstream keeps ``grad**2 + eps`` alive while it builds the ``row x col`` second-moment estimate
    (or ``rsqrt`` of the unfactored one) in a second weight-sized tensor, and subtracts the update
    through a negated copy. Here the square is built in place, the estimate written over it (``out=``)
    and the update subtracted (``a - b`` is ``a + (-b)`` exactly): the same values, bit for bit, and
    the same state, so checkpoints load in either class.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_one(group, p)
        return loss

    def _step_one(self, group: dict, p: torch.Tensor) -> None:
        grad = p.grad
        if grad.dtype in {torch.float16, torch.bfloat16}:
            grad = grad.float()
        if grad.is_sparse:
            raise RuntimeError("Adafactor does not support sparse gradients.")
        state = self.state[p]
        grad_shape = grad.shape
        factored, use_first_moment = self._get_options(group, grad_shape)
        if len(state) == 0:
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
        update = grad.square().add_(group["eps"][0])  # upstream: (grad**2) + eps, a second tensor
        if factored:
            exp_avg_sq_row, exp_avg_sq_col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            exp_avg_sq_row.mul_(beta2t).add_(update.mean(dim=-1), alpha=(1.0 - beta2t))
            exp_avg_sq_col.mul_(beta2t).add_(update.mean(dim=-2), alpha=(1.0 - beta2t))
            # upstream's _approx_sq_grad, its product written over the squared gradient
            r_factor = (exp_avg_sq_row / exp_avg_sq_row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = exp_avg_sq_col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor, out=update)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2t).add_(update, alpha=(1.0 - beta2t))
            update = torch.rsqrt(exp_avg_sq, out=update)
        update.mul_(grad)
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if use_first_moment:
            exp_avg = state["exp_avg"]
            exp_avg.mul_(group["beta1"]).add_(update, alpha=(1 - group["beta1"]))
            update = exp_avg
        if group["weight_decay"] != 0:
            p_data_fp32.add_(p_data_fp32, alpha=(-group["weight_decay"] * lr))
        p_data_fp32.sub_(update)  # upstream: add_(-update), a negated copy
        if p.dtype in {torch.float16, torch.bfloat16}:
            p.copy_(p_data_fp32)
