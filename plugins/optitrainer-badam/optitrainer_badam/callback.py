"""Trainer callback: the model's ``requires_grad`` flags follow the active block only while training."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

__all__ = ["TrainableBlockCallback"]


class TrainableBlockCallback(TrainerCallback):
    """Freezes all but the active block when training starts, and unfreezes them when it ends.

    Without it the model would stay frozen after ``train()`` except for the last block: a second
    optimizer built from its trainable parameters (a new trainer on the same model) would see one block.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def on_train_begin(self, args, state, control, **kwargs):
        self.optimizer.apply_requires_grad()

    def on_train_end(self, args, state, control, **kwargs):
        self.optimizer.restore_requires_grad()
