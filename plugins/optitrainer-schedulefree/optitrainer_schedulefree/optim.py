"""Schedule-free optimizers whose train/eval switches are exact.

Upstream (``schedulefree``) keeps only ``z`` (and the Adam second moment) in its state; the model
holds ``y`` in train mode and ``x`` in eval mode, and each switch recomputes one from the other by
interpolation::

    eval():  p.lerp_(z, 1 - 1/beta1)    # y -> x
    train(): p.lerp_(z, 1 - beta1)      # x -> y, rounded: not the y training left

So every evaluation or save perturbs the training trajectory by floating-point rounding, and a run
with evaluations drifts from one without. Here ``eval()`` keeps an exact copy of ``y`` in the
optimizer state (key ``"y"``, only while in eval mode: one extra copy of the trained weights during
evaluation and saving, and in a checkpoint's ``optimizer.pt``), and ``train()`` puts it back, after
checking bit for bit that the model still holds the ``x`` computed from it. If the weights changed
in between (``load_best_model_at_end``, a user loading other weights), ``train()`` falls back to
upstream's interpolation from the current weights and says so.

``step()`` is upstream's, untouched: the update numbers are upstream's.
"""

from __future__ import annotations

import logging

import torch
from schedulefree import AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree

logger = logging.getLogger("optitrainer.schedulefree")

__all__ = [
    "ExactModesMixin",
    "ScheduleFreeAdamW",
    "ScheduleFreeRAdam",
    "ScheduleFreeSGD",
    "STASH_KEY",
]

#: optimizer-state key of the exact train-mode weights, present only while in eval mode
STASH_KEY = "y"


class ExactModesMixin:
    """``eval()`` stashes the train-mode weights, ``train()`` restores them bit for bit."""

    @staticmethod
    def _momentum(group: dict) -> float:
        return group["betas"][0]

    @property
    def in_train_mode(self) -> bool:
        return bool(self.param_groups[0]["train_mode"])

    @torch.no_grad()
    def eval(self) -> None:
        for group in self.param_groups:
            if group["train_mode"]:
                weight = 1 - 1 / self._momentum(group)
                for p in group["params"]:
                    state = self.state[p]
                    if "z" in state:
                        state[STASH_KEY] = p.detach().clone(memory_format=torch.preserve_format)
                        p.lerp_(end=state["z"].to(p.device), weight=weight)  # upstream's y -> x
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        rebuilt = 0
        for group in self.param_groups:
            if not group["train_mode"]:
                momentum = self._momentum(group)
                to_x, to_y = 1 - 1 / momentum, 1 - momentum
                for p in group["params"]:
                    state = self.state[p]
                    if "z" not in state:
                        continue
                    z = state["z"].to(p.device)
                    y = state.pop(STASH_KEY, None)
                    if y is not None:
                        y = y.to(device=p.device, dtype=p.dtype)
                        # the x that eval() computed from this y, by the very same operation
                        expected_x = y.clone(memory_format=torch.preserve_format).lerp_(end=z, weight=to_x)
                        if torch.equal(expected_x, p):
                            p.copy_(y)
                            continue
                        rebuilt += 1
                    p.lerp_(end=z, weight=to_y)  # upstream's x -> y
                group["train_mode"] = True
        if rebuilt:
            logger.warning(
                "schedule-free train(): the weights of %d parameter(s) changed while the optimizer was in "
                "eval mode (e.g. a best checkpoint was loaded); their train-mode weights were rebuilt from "
                "the current weights by interpolation, as upstream schedulefree does",
                rebuilt,
            )

    def applied_lr(self) -> float:
        """The learning rate the last step applied (scheduler's lr x the optimizer's own warmup/rectification)."""
        return float(self.param_groups[0]["scheduled_lr"])


class ScheduleFreeAdamW(ExactModesMixin, AdamWScheduleFree):
    """``schedulefree.AdamWScheduleFree`` with exact train/eval switches."""


class ScheduleFreeRAdam(ExactModesMixin, RAdamScheduleFree):
    """``schedulefree.RAdamScheduleFree`` with exact train/eval switches."""


class ScheduleFreeSGD(ExactModesMixin, SGDScheduleFree):
    """``schedulefree.SGDScheduleFree`` with exact train/eval switches."""

    @staticmethod
    def _momentum(group: dict) -> float:
        return group["momentum"]
