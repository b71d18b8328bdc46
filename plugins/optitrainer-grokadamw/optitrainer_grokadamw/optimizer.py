"""``GrokAdamW``: upstream's ``grokadamw.GrokAdamW`` with its state where PyTorch expects it.

Same update, number for number, as ``grokadamw==0.1.2`` (``tests/test_grokadamw.py`` checks it
bit for bit against the upstream class). What changes:

* **State in ``self.state[p]``.** Upstream keeps each parameter's state in
  ``param_groups[i]["state"][p]``, a dict keyed by the parameter *tensors*. ``state_dict()`` then
  pickles a copy of every parameter as a dictionary key next to the three state tensors, and after
  ``load_state_dict()`` the keys are those copies, not the model's parameters: the lookup misses and
  the state silently restarts from zero. Here the state lives in the standard ``self.state[p]``
  (``step`` as an int, ``exp_avg``, ``exp_avg_sq``, ``grok_ema`` as tensors), so ``state_dict()`` holds
  what it should, loads with ``torch.load(weights_only=True)`` and resumes exactly.
* **No host round trip.** Upstream creates the state on the CPU and, every step and for every
  parameter, copies the three state tensors to the parameter's device and back. Here they are
  created on the parameter's device and updated in place.
* **No ``torch.cuda.amp.autocast()``** around the arithmetic: it only wraps in-place elementwise ops
  on tensors of one dtype, which autocast never recasts (so it changes no number), and it is
  deprecated (a warning every step on CPU).
* **The grokking signal can be fed.** Upstream's default signal reads ``group["train_loss"]`` and
  ``group["eval_loss"]``, which nothing ever sets, so it is always 0. They are declared param-group
  entries here (``None`` until set); :meth:`set_losses` sets them (optitrainer's callback calls it
  from the trainer's logs), and being in the param groups they travel with the checkpoint.
* ``grokking_signal_fns`` (callables, which cannot be saved) is kept as an attribute instead of a
  param-group entry.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from grokadamw import GrokAdamW as _UpstreamGrokAdamW

logger = logging.getLogger("optitrainer.grokadamw")

__all__ = ["GrokAdamW"]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "grok_ema")


class GrokAdamW(_UpstreamGrokAdamW):
    """GrokAdamW (``grokadamw.GrokAdamW``) with standard, resumable, device-resident state.

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay: as in AdamW (decoupled decay ``p *= 1 - lr * weight_decay``).
        alpha_init: base decay of the gradient EMA ``grok_ema`` (the slow "grokking" component).
        lamb: weight of ``grok_ema`` added to the gradient (``grad + lamb * grok_ema``).
        gamma: per-position decay of beta1: the i-th parameter (with a gradient) of a group uses
            ``beta1 * (1 - gamma) ** i``.
        grokking_signal_fns: optional zero-argument callables returning a float (or ``None``); their
            mean is the grokking signal. ``None`` uses the default signal from the fed losses.
        grokking_signal_decay_rate: ``alpha = alpha_init * exp(-rate * signal)``.
        gradient_clipping: each parameter's gradient is clipped to this norm (0 disables).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        alpha_init: float = 0.98,
        lamb: float = 2.0,
        gamma: float = 0.1,
        grokking_signal_fns: list[Callable[[], float | None]] | None = None,
        grokking_signal_decay_rate: float = 0.1,
        gradient_clipping: float = 1.0,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            alpha_init=alpha_init,
            lamb=lamb,
            gamma=gamma,
            grokking_signal_fns=None,
            grokking_signal_decay_rate=grokking_signal_decay_rate,
            gradient_clipping=gradient_clipping,
        )
        # callables cannot go into a checkpoint: keep them off the param groups
        self.defaults.pop("grokking_signal_fns", None)
        self.defaults.update(train_loss=None, eval_loss=None)
        for group in self.param_groups:
            group.pop("grokking_signal_fns", None)
            group.setdefault("train_loss", None)
            group.setdefault("eval_loss", None)
        self.grokking_signal_fns = list(grokking_signal_fns) if grokking_signal_fns is not None else None
        #: the signal used by the last step (of the last group), for logging
        self.last_grokking_signal: float | None = None

    def __setstate__(self, state: dict) -> None:
        torch.optim.Optimizer.__setstate__(self, state)
        self.__dict__.setdefault("grokking_signal_fns", None)
        self.__dict__.setdefault("last_grokking_signal", None)
        for group in self.param_groups:
            group.pop("grokking_signal_fns", None)
            group.setdefault("train_loss", None)
            group.setdefault("eval_loss", None)
            group.setdefault("grokking_signal_decay_rate", 0.1)
            group.setdefault("gradient_clipping", 1.0)

    # -- the grokking signal -------------------------------------------------------------------------
    def set_losses(self, train_loss: float | None = None, eval_loss: float | None = None) -> None:
        """Record the latest training and/or evaluation loss (``None`` leaves a value unchanged)."""
        for group in self.param_groups:
            if train_loss is not None:
                group["train_loss"] = float(train_loss)
            if eval_loss is not None:
                group["eval_loss"] = float(eval_loss)

    def grokking_signal(self, group: dict[str, Any] | None = None) -> float | None:
        """The signal the next step will use for ``group`` (default: the first group)."""
        return self._compute_grokking_signal(self.param_groups[0] if group is None else group)

    def _compute_grokking_signal(self, group: dict) -> float | None:
        # upstream's rule, with the callables taken from the attribute instead of the group
        if self.grokking_signal_fns is None:
            return self._default_grokking_signal(group.get("train_loss"), group.get("eval_loss"))
        signals = []
        for fn in self.grokking_signal_fns:
            try:
                signal = fn()
                if signal is not None:
                    signals.append(signal)
            except Exception as e:  # upstream ignores a failing function, and so do we
                logger.warning("Error in grokking_signal_fn: %s. Ignoring this function.", e)
        return sum(signals) / len(signals) if signals else None

    # -- the update -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            signal = self._compute_grokking_signal(group)
            self.last_grokking_signal = signal
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params, signal)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor], signal: float | None) -> None:
        """Upstream's ``_update_group``, op for op, on state that stays on the parameter's device."""
        beta1, beta2 = group["betas"]
        alpha = group["alpha_init"]
        if signal is not None:
            alpha = alpha * math.exp(-group["grokking_signal_decay_rate"] * signal)
        for i, p in enumerate(params):
            grad = p.grad
            state = self.state[p]
            if not state:
                state["step"] = 0
                for key in _STATE_KEYS:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avg, exp_avg_sq, grok_ema = (state[k] for k in _STATE_KEYS)
            state["step"] += 1

            if group["gradient_clipping"] > 0:
                torch.nn.utils.clip_grad_norm_(p, group["gradient_clipping"])

            layer_beta1 = beta1 * (1 - group["gamma"]) ** i
            grok_ema.mul_(alpha).add_(grad, alpha=1 - alpha)
            grok_grad = grad + group["lamb"] * grok_ema

            exp_avg.mul_(layer_beta1).add_(grok_grad, alpha=1 - layer_beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grok_grad, grok_grad, value=1 - beta2)

            # upstream corrects the bias with beta1, not with the layer's beta1: kept as is
            bias_correction1 = 1 - beta1 ** state["step"]
            bias_correction2 = 1 - beta2 ** state["step"]
            step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1

            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size)

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return torch.optim.Optimizer.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this class, or migrate one written by upstream's ``GrokAdamW``."""
        state_dict = _migrate_upstream_state_dict(self, state_dict)
        torch.optim.Optimizer.load_state_dict(self, state_dict)
        for group in self.param_groups:
            group.pop("grokking_signal_fns", None)
            group.setdefault("train_loss", None)
            group.setdefault("eval_loss", None)


def _migrate_upstream_state_dict(optimizer: GrokAdamW, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Move upstream's per-group ``"state"`` (keyed by parameter copies) into the standard ``"state"``.

    Upstream inserts a parameter's state the first time it has a gradient, so when every parameter of
    a group was stepped, the entries are in the group's parameter order; they are moved over when
    their number and shapes match the group's parameters, else dropped with a warning (what
    upstream itself silently does).
    """
    groups = state_dict.get("param_groups", [])
    if not any("state" in g or "grokking_signal_fns" in g for g in groups):
        return state_dict
    state_dict = dict(state_dict)
    state = dict(state_dict.get("state", {}))
    new_groups = []
    for index, saved in enumerate(groups):
        saved = dict(saved)
        saved.pop("grokking_signal_fns", None)
        old = saved.pop("state", None) or {}
        entries = list(old.values())
        params = optimizer.param_groups[index]["params"] if index < len(optimizer.param_groups) else []
        if (
            entries
            and len(entries) == len(params) == len(saved["params"])
            and all(tuple(e[k].shape) == tuple(p.shape) for e, p in zip(entries, params) for k in _STATE_KEYS)
        ):
            for pid, entry in zip(saved["params"], entries):
                # cloned: an in-memory upstream state_dict shares these tensors with a live optimizer
                state[pid] = {"step": int(entry["step"]), **{k: entry[k].clone() for k in _STATE_KEYS}}
        elif entries:
            warnings.warn(
                f"GrokAdamW: param group {index} of this checkpoint holds upstream-format state for "
                f"{len(entries)} of {len(params)} parameters, which cannot be matched to them; the "
                "optimizer state of this group restarts from zero (as upstream's own resume does)",
                stacklevel=3,
            )
        new_groups.append(saved)
    state_dict["state"] = state
    state_dict["param_groups"] = new_groups
    return state_dict
