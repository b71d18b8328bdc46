"""LOMO and AdaLomo with one gradient hook per parameter (the update of ``lomo-optim`` 0.1.1).

Upstream's ``lomo_optim.Lomo``/``AdaLomo`` register the same hook on every parameter, and each call
of that hook walks ``model.named_parameters()`` looking for the one gradient that became ready since
the previous call: a backward pass costs O(number of tensors²) Python work. Upstream's ``AdaLomo``
also allocates its second-moment statistics with ``.cuda()`` (it cannot even be built without a
GPU) and keeps them in plain attributes, outside ``state_dict()`` (a checkpoint loses them).

The classes here keep upstream's update formulas operation for operation (the tests compare them
bit for bit with upstream on the same model and batches) and change the machinery around them:

* one ``register_post_accumulate_grad_hook`` per parameter, which handles only that parameter: the
  backward pass is linear in the number of tensors, and the trailing ``grad_func(0)`` call upstream
  needs for the last parameter is gone (the hook runs after the gradient is accumulated);
* the hooks act only inside :meth:`FusedBackwardOptimizer.fused_backward`; any other backward pass
  accumulates ``.grad`` as usual instead of silently updating the weights with a stale learning rate;
* AdaLomo's statistics live in ``self.state[p]`` on the parameter's device, float32, and resume
  exactly (``state_dict`` also carries the global step counter);
* weight decay is per parameter group (the trainer's decay / no-decay groups: no decay on biases
  and norms), the rest of the update is upstream's;
* gradient-norm clipping is one call: ``fused_backward(loss, lr, max_grad_norm)`` runs upstream's
  norm pass (a first backward with ``retain_graph=True`` that only measures) and then the fused
  update with the clipping coefficient, and returns the measured pre-clip norm. Given the model
  (``model=``, the factories pass it when ``max_grad_norm > 0``), the update needs no second backward
  for ``nn.Linear``/``nn.Embedding`` weights: their gradients are rebuilt bit for bit from the inputs
  and output gradients recorded during the forward and the norm pass (``optitrainer.clipping``), vectors
  keep their norm-pass gradient, and only the other parameters get a second backward (``inputs=``);
* data parallelism (DDP): ``fused_backward(..., average_gradient=fn)`` calls ``fn(grad)`` in each
  hook, on the float32 copy of the gradient, before the norm pass measures it and before the update
  uses it; ``fn`` averages it across the ranks in place (the trainer passes
  ``BackwardContext.average_gradient`` and keeps the model out of DDP's wrapper). Every rank then
  measures the same global norm and applies the same update to its whole copy of the tensor, so the
  ranks stay bit-identical. The hooks must fire in the same order on every rank (one all-reduce per
  tensor and pass): the same graph on every rank, as DDP itself assumes.

Not supported (refused by the plugin's capabilities): DeepSpeed (every ZeRO stage, including
upstream's ZeRO-3 path) and FSDP, fp16 loss scaling (upstream's ``DynamicLossScaler`` only engages
for float16 losses).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from lomo_optim.adalomo import AdaLomo as Upstream  # its static math helpers, reused as they are
from torch.optim import Optimizer

__all__ = ["AdaLomo", "FusedBackwardOptimizer", "Lomo"]

#: key of the optimizer-wide counters in ``state_dict()`` (torch's loader ignores unknown keys)
EXTRA_STATE_KEY = "fused_backward"


class FusedBackwardOptimizer(Optimizer):
    """Base class: the update of each parameter runs inside the backward pass, from its own hook.

    ``step()`` is a no-op (the trainer still calls it; the scheduler counts it). Drive it with
    :meth:`fused_backward`.
    """

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], model: torch.nn.Module | None = None
    ) -> None:
        super().__init__(params, defaults)
        self.lr: float = float(defaults["lr"])  # learning rate of the running / last fused_backward
        self.step_num = 0  # number of fused updates done (AdaLomo's beta2 schedule reads it)
        self.clip_coef: torch.Tensor | None = None
        self._mode: str | None = None  # None: hooks idle; "norm": measure; "update": update
        #: averages a gradient across data-parallel ranks in place; set only during fused_backward
        self._average_gradient: Callable[[torch.Tensor], None] | None = None
        #: averages in buckets overlapped with backward (``BackwardContext.averager``); during fused_backward
        self._averager: Any = None
        self._norms: list[torch.Tensor] = []
        self._handles = []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    # the group is looked up by index at call time: load_state_dict replaces the dicts
                    self._handles.append(
                        p.register_post_accumulate_grad_hook(lambda q, i=index: self._on_grad(q, i))
                    )
        #: records each forward for clipping without a second full backward (None: two passes)
        self._rebuilder = None
        self._kept: dict[int, torch.Tensor] | None = None  # vector gradients kept from the norm pass
        self._norm_of: dict[int, torch.Tensor] | None = None  # id(p) -> its norm in the norm pass
        if model is not None:
            from optitrainer.plugin import GradientRebuilder

            self._rebuilder = GradientRebuilder(model, [p for g in self.param_groups for p in g["params"]])
            self._model = model
            self._rebuilder.start()  # until the next fused_backward: the forward it will differentiate

    # -- what subclasses define -------------------------------------------------------------------
    def _scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def _unscale(self, grad_fp32: torch.Tensor) -> None:
        pass

    def _update(self, p: torch.Tensor, grad_fp32: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- the hook ---------------------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor, group_index: int) -> None:
        if self._mode is None or p.grad is None:
            return  # an ordinary backward pass: leave .grad accumulated
        with torch.no_grad():
            grad_fp32 = p.grad.to(torch.float32)
            p.grad = None
            # DDP: the rank-averaged gradient, before it is measured or used (the same on every rank)
            if self._averager is not None:  # in buckets, while backward goes on
                self._averager.add(grad_fp32, functools.partial(self._averaged, p, group_index))
                return
            if self._average_gradient is not None:
                self._average_gradient(grad_fp32)
            self._consume(p, group_index, grad_fp32)

    def _averaged(self, p: torch.Tensor, group_index: int, average: torch.Tensor) -> None:
        # a view into a reused bucket: what the norm pass keeps is copied
        keeps = self._mode == "norm" and self._kept is not None and p.dim() <= 1
        with torch.no_grad():
            self._consume(p, group_index, average.clone() if keeps else average)

    def _consume(self, p: torch.Tensor, group_index: int, grad_fp32: torch.Tensor) -> None:
        self._unscale(grad_fp32)
        if self._mode == "norm":
            # two backward passes: this one only measures, the next one updates
            self._norms.append(torch.norm(grad_fp32, 2.0))
            if self._norm_of is not None:
                self._norm_of[id(p)] = self._norms[-1]
            if self._kept is not None and p.dim() <= 1:
                self._kept[id(p)] = grad_fp32
        else:
            self._update(p, grad_fp32, self.param_groups[group_index])

    def _backward(self, loss: torch.Tensor, mode: str, **kwargs: Any) -> None:
        self._mode = mode
        try:
            self._scale_loss(loss).backward(**{"retain_graph": mode == "norm", **kwargs})
            if self._averager is not None:
                self._averager.flush()  # the last buckets, still in this pass's mode
        finally:
            self._mode = None

    @contextlib.contextmanager
    def _averaging(
        self, average_gradient: Callable[[torch.Tensor], None] | None, averager: Any = None
    ) -> Iterator[None]:
        previous = self._average_gradient, self._averager
        if average_gradient is not None:
            self._average_gradient = average_gradient
        if averager is not None:
            self._averager = averager
        try:
            yield
        finally:
            self._average_gradient, self._averager = previous

    # -- public API -------------------------------------------------------------------------------
    def grad_norm(
        self,
        loss: torch.Tensor,
        max_grad_norm: float,
        average_gradient: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Norm pass: backward with ``retain_graph=True`` that only measures the global gradient norm.

        Sets the clipping coefficient the next :meth:`fused_backward` update applies (upstream's
        formula: ``clamp(max_grad_norm / (norm + 1e-6), max=1)``) and returns the pre-clip norm.
        ``average_gradient``: see :meth:`fused_backward` (the norm is that of the averaged gradient).
        """
        self._norms = []
        with self._averaging(average_gradient):
            self._backward(loss, "norm")
        return self._set_clip_coef(loss, max_grad_norm)

    def _set_clip_coef(self, loss: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        with torch.no_grad():
            if self._norms:
                total_norm = torch.norm(torch.stack(self._norms), 2.0)
            else:
                total_norm = torch.zeros((), dtype=torch.float32, device=loss.device)
            self._norms = []
            self.clip_coef = torch.clamp(float(max_grad_norm) / (total_norm + 1e-6), max=1.0)
        return total_norm

    def fused_backward(
        self,
        loss: torch.Tensor,
        lr: float | None = None,
        max_grad_norm: float | None = None,
        average_gradient: Callable[[torch.Tensor], None] | None = None,
        averager: Any = None,
    ) -> float | None:
        """Backward pass that updates every parameter as soon as its gradient is ready.

        ``lr`` (default: the first group's ``lr``) is the learning rate of this update, for every
        group. With ``max_grad_norm > 0`` a norm pass runs first (see :meth:`grad_norm`) and the
        gradients are clipped to that global norm; the measured pre-clip norm is returned. Without
        clipping no norm is measured and ``None`` is returned.

        ``average_gradient(grad)`` (data parallelism): averages a gradient across the ranks in place;
        each hook calls it on the float32 copy of its gradient before measuring or using it, in both
        passes. Used only for the duration of this call. ``averager`` (``BackwardContext.averager``) does
        the same in buckets overlapped with backward, and takes precedence.
        """
        self.lr = float(self.param_groups[0]["lr"] if lr is None else lr)
        total_norm = None
        self.clip_coef = None
        clips = max_grad_norm is not None and max_grad_norm > 0
        try:
            with self._averaging(average_gradient, averager):
                if clips and self._rebuilding():
                    return float(self._clip_rebuilding(loss, max_grad_norm))
                if clips:
                    total_norm = self.grad_norm(loss, max_grad_norm)
                self.step_num += 1
                try:
                    self._backward(loss, "update")
                finally:
                    self.clip_coef = None
        finally:
            if self._rebuilder is not None:
                self._rebuilder.start()  # the next forward
        return None if total_norm is None else float(total_norm)

    def _rebuilding(self) -> bool:
        from optitrainer.plugin import activation_checkpointing

        # checkpointing recomputes the forward in backward: the recorded inputs would outlive it
        return (
            self._rebuilder is not None
            and self._rebuilder.recording
            and not activation_checkpointing(self._model)
        )

    def _clip_rebuilding(self, loss: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        """Norm pass, then updates on rebuilt / kept gradients; a second backward only for the rest."""
        from optitrainer.plugin import check_rebuilt

        indexed = [(i, p) for i, g in enumerate(self.param_groups) for p in g["params"] if p.requires_grad]
        rebuilt, _, fallback = self._rebuilder.plan([p for _, p in indexed])
        self._norms, self._kept = [], {}
        measured: dict[int, torch.Tensor] = {}
        self._norm_of = measured
        try:
            self._backward(loss, "norm", retain_graph=bool(fallback))
        finally:
            kept, self._kept, self._norm_of = self._kept, None, None
        total_norm = self._set_clip_coef(loss, max_grad_norm)
        self.step_num += 1
        try:
            used = [p for p in fallback if id(p) in measured]
            if used:  # before any update: the graph saved the other weights
                self._backward(loss, "update", inputs=used)
            rebuilt_ids = {id(p) for p in rebuilt}
            with torch.no_grad():
                for index, p in indexed:
                    if id(p) not in measured:
                        continue  # no gradient this step: no update
                    if id(p) in rebuilt_ids:
                        grad = self._rebuilder.rebuild(p)
                        if grad is not None:
                            grad = grad.to(torch.float32)
                            if self._averager is not None:  # stepped once its bucket's average arrives
                                self._averager.add(
                                    grad, functools.partial(self._rebuilt_averaged, p, index, measured[id(p)])
                                )
                                continue
                            if self._average_gradient is not None:
                                self._average_gradient(grad)
                            self._unscale(grad)
                        check_rebuilt(f"a {tuple(p.shape)} weight", grad, measured[id(p)])
                    elif id(p) in kept:
                        grad = kept.pop(id(p))
                    else:
                        continue  # stepped by the second backward above
                    self._update(p, grad, self.param_groups[index])
                if self._averager is not None:
                    self._averager.flush()
        finally:
            self.clip_coef = None
        return total_norm

    def _rebuilt_averaged(
        self, p: torch.Tensor, group_index: int, norm: torch.Tensor, grad: torch.Tensor
    ) -> None:
        from optitrainer.plugin import check_rebuilt

        with torch.no_grad():
            self._unscale(grad)
            check_rebuilt(f"a {tuple(p.shape)} weight", grad, norm)
            self._update(p, grad, self.param_groups[group_index])

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """No-op: the update already ran inside :meth:`fused_backward`."""
        if closure is not None:
            raise RuntimeError(
                f"{type(self).__name__} updates inside the backward pass: call fused_backward(loss, lr), not step(closure)"
            )
        return None

    def remove_hooks(self) -> None:
        """Detach the gradient hooks from the parameters (the optimizer is unusable afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._rebuilder is not None:
            self._rebuilder.close()
            self._rebuilder = None

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out[EXTRA_STATE_KEY] = {"step": self.step_num}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(EXTRA_STATE_KEY, {})
        super().load_state_dict(state_dict)
        # torch casts floating-point state to the parameter's dtype; the statistics stay float32
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)
        self.step_num = int(extra.get("step", 0))


class Lomo(FusedBackwardOptimizer):
    """LOMO: SGD fused into the backward pass (``lomo_optim.Lomo``'s update, per parameter).

    Args:
        params: parameters or parameter groups (each group may set ``weight_decay``).
        lr: learning rate (``fused_backward`` overrides it per step).
        weight_decay: decoupled weight decay ``p *= 1 - lr * weight_decay`` (default for groups).
        clip_grad_value: clamp each gradient element to ``[-v, v]`` before the update.
        model: the model the parameters belong to; with it, clipping rebuilds Linear/Embedding weight
            gradients instead of running a second backward (see the module's docstring).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        clip_grad_value: float | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "clip_grad_value": clip_grad_value}
        super().__init__(params, defaults, model=model)

    def _update(self, p: torch.Tensor, grad_fp32: torch.Tensor, group: dict[str, Any]) -> None:
        # lomo_optim 0.1.1, Lomo.fuse_update, the non-gather branch
        clip_value = group["clip_grad_value"]
        if clip_value is not None and clip_value > 0:
            grad_fp32.clamp_(min=-clip_value, max=clip_value)
        if self.clip_coef is not None:
            grad_fp32.mul_(self.clip_coef)
        p_fp32 = p.data.to(torch.float32)
        weight_decay = group["weight_decay"]
        if weight_decay > 0.0:
            p_fp32.mul_(1.0 - self.lr * weight_decay)
        p_fp32.add_(grad_fp32, alpha=-self.lr)
        p.data.copy_(p_fp32)


class AdaLomo(FusedBackwardOptimizer):
    """AdaLomo: LOMO with Adafactor-style factored second moments (``lomo_optim.AdaLomo``'s update).

    The statistics are float32 tensors in ``self.state[p]`` on the parameter's device
    (``exp_avg_sq_row``/``exp_avg_sq_col`` for matrices, ``exp_avg_sq`` for vectors), so they are
    saved and resumed with the optimizer's ``state_dict``.

    Args:
        params: parameters or parameter groups (each group may set ``weight_decay``).
        lr: learning rate (``fused_backward`` overrides it per step); the step is scaled by
            ``max(eps[1], RMS(p))``.
        loss_scale: static loss scale; the loss is multiplied and the gradients divided by it
            (upstream's default 2**10; 0 disables).
        eps: ``(eps1, eps2)``: eps1 is added to the squared gradient, eps2 bounds the parameter RMS
            from below.
        clip_threshold: the update is divided by ``max(1, RMS(update) / clip_threshold)``.
        decay_rate: ``beta2_t = 1 - t ** decay_rate``.
        weight_decay: decoupled weight decay ``p *= 1 - lr_t * weight_decay`` (default for groups).
        clip_grad_value: clamp each gradient element to ``[-v, v]`` before the update.
        model: the model the parameters belong to; with it, clipping rebuilds Linear/Embedding weight
            gradients instead of running a second backward (see the module's docstring).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        loss_scale: float = 2**10,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
        clip_grad_value: float | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": tuple(eps),
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "weight_decay": weight_decay,
            "clip_grad_value": clip_grad_value,
        }
        self.loss_scale = loss_scale
        super().__init__(params, defaults, model=model)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if p.dim() > 1:  # factored: one row and one column statistic (Adafactor's shapes)
                    state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
                    state["exp_avg_sq_col"] = torch.zeros(
                        p.shape[:-2] + p.shape[-1:], dtype=torch.float32, device=p.device
                    )
                else:
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale if self.loss_scale else loss

    def _unscale(self, grad_fp32: torch.Tensor) -> None:
        if self.loss_scale:
            grad_fp32.div_(self.loss_scale)

    def _update(self, p: torch.Tensor, grad_fp32: torch.Tensor, group: dict[str, Any]) -> None:
        # lomo_optim 0.1.1, AdaLomo.fuse_update, the non-gather branch, with the state in self.state
        eps, state = group["eps"], self.state[p]
        clip_value = group["clip_grad_value"]
        if clip_value is not None and clip_value > 0:
            grad_fp32.clamp_(min=-clip_value, max=clip_value)
        if self.clip_coef is not None:
            grad_fp32.mul_(self.clip_coef)

        decay_rate = group["decay_rate"]
        if self.step_num == 0 and decay_rate < 0:  # upstream's guard against 0 ** negative
            decay_rate = -decay_rate
        beta2t = 1.0 - math.pow(self.step_num, decay_rate)
        # upstream's arithmetic with one gradient-sized temporary instead of three at a time:
        # ``grad**2 + eps`` in place, and the factored estimate written over it (``out=``)
        update = grad_fp32.square().add_(eps[0])
        if p.dim() > 1:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (
                (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            )  # Upstream._approx_sq_grad
            c_factor = col.unsqueeze(-2).rsqrt()
            torch.mul(r_factor, c_factor, out=update)
            update.mul_(grad_fp32)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad_fp32)

        update.div_((Upstream._rms(update) / group["clip_threshold"]).clamp_(min=1.0))

        p_fp32 = p.data.to(torch.float32)
        p_rms = torch.norm(p_fp32, 2.0) / math.sqrt(p.numel())
        lr = self.lr
        param_scale = max(eps[1], p_rms)
        lr = lr * param_scale
        weight_decay = group["weight_decay"]
        if weight_decay > 0.0:
            p_fp32.mul_(1.0 - lr * weight_decay)
        p_fp32.add_(update, alpha=-lr)
        p.data.copy_(p_fp32)
