"""The trainer callback of the schedule-free plugin (imported only when an optimizer is built)."""

from __future__ import annotations

from transformers import TrainerCallback

from .optim import STASH_KEY


class ScheduleFreeCallback(TrainerCallback):
    """Warmup given as a ratio, and eval mode at the end of training.

    - ``on_train_begin``: a ratio ``warmup_steps`` (< 1) of an epoch-based run becomes
      ``ceil(ratio * max_steps)`` steps once ``max_steps`` is known, as for the scheduler.
    - ``on_step_end`` of the last step: eval mode, so that the last checkpoint, the end-of-training
      evaluation, ``load_best_model_at_end`` and ``trainer.model`` after ``train()`` all see the
      averaged weights ``x``, and a best checkpoint loaded afterwards lands on an eval-mode optimizer
      (the next ``train()`` then rebuilds ``y`` from it instead of restoring a stale one).
    - ``on_train_end``: the same, should training have stopped before ``max_steps``.
    """

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def on_train_begin(self, args, state, control, **kwargs):
        ratio = args.warmup_steps or 0
        if 0 < ratio < 1 and state.max_steps > 0:
            steps = args.get_warmup_steps(state.max_steps)
            for group in self.optimizer.param_groups:
                if "warmup_steps" in group:  # RAdam has none
                    group["warmup_steps"] = steps

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_training_stop or state.global_step >= state.max_steps:
            self.optimizer.eval()

    def on_train_end(self, args, state, control, **kwargs):
        if not self.optimizer.param_groups[0]["train_mode"]:
            return
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            # the model already holds the best checkpoint's eval-mode weights: only the flag is stale
            for group in self.optimizer.param_groups:
                group["train_mode"] = False
                for p in group["params"]:
                    self.optimizer.state[p].pop(STASH_KEY, None)
        else:
            self.optimizer.eval()
