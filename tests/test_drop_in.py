"""Where the optimizer is not concerned, OptiTrainer behaves as transformers.Trainer: callbacks, checkpoints."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import Trainer, TrainingArguments

from optitrainer import OptiTrainer
from optitrainer.testing import (
    SyntheticLMDataset,
    assert_same_run,
    run_training,
    tiny_llama,
    training_arguments,
)

HF = {"trainer_cls": Trainer, "arguments_cls": TrainingArguments}
SAVE = {"save_strategy": "steps", "save_steps": 2, "warmup_steps": 1}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """Warnings transformers logs (its library logger does not propagate to pytest's capture)."""
    handler = _Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_the_callback_list_is_trainers(tmp_path):
    def build(trainer_cls, arguments_cls):
        args = training_arguments(tmp_path, arguments_cls=arguments_cls, optim="adamw_torch", max_steps=2)
        return trainer_cls(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset())

    ours, theirs = build(OptiTrainer, None), build(Trainer, TrainingArguments)
    assert [type(c) for c in ours.callback_handler.callbacks] == [
        type(c) for c in theirs.callback_handler.callbacks
    ]


def test_trainer_state_is_trainers_and_provenance_sits_beside_it(tmp_path):
    run_training("adamw_torch", tmp_path / "ours", steps=2, **SAVE)
    run_training("adamw_torch", tmp_path / "theirs", steps=2, **SAVE, **HF)
    ours, theirs = (
        json.loads((tmp_path / w / "checkpoint-2" / "trainer_state.json").read_text())
        for w in ("ours", "theirs")
    )
    assert ours["stateful_callbacks"] == theirs["stateful_callbacks"]
    provenance = json.loads((tmp_path / "ours" / "checkpoint-2" / "optitrainer.json").read_text())
    assert provenance["optimizer"] == "adamw_torch" and provenance["distribution"] == "optitrainer"


@pytest.mark.parametrize("writer, reader", [("optitrainer", "transformers"), ("transformers", "optitrainer")])
def test_a_checkpoint_resumes_in_the_other_trainer_silently_and_exactly(
    tmp_path, writer, reader, transformers_warnings
):
    """adamw_torch trains to the same bits under both trainers, so a resume across them must too."""
    kinds = {"optitrainer": {}, "transformers": HF}
    straight = run_training("adamw_torch", tmp_path / "straight", steps=4, **SAVE, **kinds[writer])
    ckpt = tmp_path / "straight" / "checkpoint-2"
    transformers_warnings.clear()
    resumed = run_training(
        "adamw_torch",
        tmp_path / "resumed",
        steps=4,
        resume_from_checkpoint=str(ckpt),
        **SAVE,
        **kinds[reader],
    )
    assert not [m for m in transformers_warnings if "callbacks" in m], transformers_warnings
    assert_same_run(resumed, straight)
