"""What transformers' own layerwise mode gets wrong, measured on the same tiny model, and what we do."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from optitrainer import OptiTrainer, OptiTrainingArguments
from optitrainer.testing import SyntheticLMDataset, max_param_diff, tiny_llama, training_arguments

pytest.importorskip("galore_torch")
TARGETS = [r".*.attn.*", r".*.mlp.*"]


class Snapshots(TrainerCallback):
    def __init__(self):
        self.params = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})


def first_step(trainer_cls, arguments_cls, tmp_path):
    """One step at scheduled lr 0 (warmup starts at 0): how far did the weights move, what was logged?"""
    model = tiny_llama()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    snaps = Snapshots()
    args = training_arguments(
        tmp_path,
        arguments_cls=arguments_cls,
        optim="galore_adamw_layerwise",
        optim_target_modules=TARGETS,
        optim_args="rank=4",
        max_steps=2,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=2,
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=SyntheticLMDataset(), callbacks=[snaps])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return max_param_diff(initial, snaps.params[0]), logs


def test_scheduled_lr_reaches_per_parameter_steps(tmp_path):
    hf_moved, hf_logs = first_step(Trainer, TrainingArguments, tmp_path / "hf")
    our_moved, our_logs = first_step(OptiTrainer, OptiTrainingArguments, tmp_path / "opti")
    # transformers logs lr 0 for step 1 but its per-parameter optimizers step at the constant base lr
    assert hf_logs[0]["learning_rate"] == 0.0 and hf_moved > 1e-4
    # optitrainer applies the scheduled lr: nothing moves at lr 0
    assert our_logs[0]["learning_rate"] == 0.0 and our_moved == 0.0


def test_no_fake_grad_norm_and_accumulation_works(tmp_path):
    _, hf_logs = first_step(Trainer, TrainingArguments, tmp_path / "hf")
    assert hf_logs[0]["grad_norm"] == 0.0  # transformers: gradients already freed, "measures" zero
    _, our_logs = first_step(OptiTrainer, OptiTrainingArguments, tmp_path / "opti")
    assert our_logs[0]["grad_norm"] > 0  # default max_grad_norm=1.0: measured by the norm pass
    with pytest.raises(ValueError, match="does not support gradient accumulation"):
        Trainer(
            model=tiny_llama(),
            args=training_arguments(
                tmp_path / "ga",
                arguments_cls=TrainingArguments,
                optim="galore_adamw_layerwise",
                optim_target_modules=TARGETS,
                gradient_accumulation_steps=2,
            ),
            train_dataset=SyntheticLMDataset(),
        ).train()


def test_layerwise_checkpoint_holds_every_state(tmp_path):
    args = {"save_strategy": "steps", "save_steps": 2, "max_steps": 2, "optim_target_modules": TARGETS}
    for name, trainer_cls, arguments_cls in (
        ("hf", Trainer, TrainingArguments),
        ("opti", OptiTrainer, OptiTrainingArguments),
    ):
        targs = training_arguments(
            tmp_path / name,
            arguments_cls=arguments_cls,
            optim="galore_adamw_layerwise",
            optim_args="rank=4",
            **args,
        )
        trainer_cls(model=tiny_llama(), args=targs, train_dataset=SyntheticLMDataset()).train()
    hf = torch.load(tmp_path / "hf" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    ours = torch.load(tmp_path / "opti" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert hf["state"] == {}  # transformers saves its dummy optimizer: the moments are lost on resume
    n_params = len(list(tiny_llama().parameters()))
    assert len(ours["layerwise"]) == n_params and all(s["state"] for s in ours["layerwise"].values())
