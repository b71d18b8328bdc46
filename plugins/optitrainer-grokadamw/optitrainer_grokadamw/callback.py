"""The trainer callback that feeds GrokAdamW's grokking signal with the trainer's losses."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

__all__ = ["GrokkingSignalCallback"]


def _eval_loss(metrics: dict[str, Any] | None) -> float | None:
    """``eval_loss``, or ``eval_<dataset>_loss`` when the trainer evaluates a dict of datasets."""
    if not metrics:
        return None
    if "eval_loss" in metrics:
        return metrics["eval_loss"]
    for key, value in metrics.items():
        if key.startswith("eval_") and key.endswith("_loss") and isinstance(value, int | float):
            return value
    return None


class GrokkingSignalCallback(TrainerCallback):
    """Passes the latest training loss (``on_log``) and evaluation loss (``on_evaluate``) to the optimizer.

    The optimizer (:class:`optitrainer_grokadamw.GrokAdamW`) keeps them in its param groups and turns
    them into the grokking signal at its next ``step()``.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.optimizer.set_losses(train_loss=logs["loss"])
        eval_loss = _eval_loss(logs)
        if eval_loss is not None:
            self.optimizer.set_losses(eval_loss=eval_loss)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        eval_loss = _eval_loss(metrics)
        if eval_loss is not None:
            self.optimizer.set_losses(eval_loss=eval_loss)
