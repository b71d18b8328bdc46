"""transformers' tests/trainer/test_trainer_callback.py with ``Trainer`` = ``optitrainer.OptiTrainer``."""

from upstream_transformers import _upstream

globals().update(_upstream.test_cases("optitrainer"))


def test_the_upstream_module_runs_optitrainer():
    from optitrainer import OptiTrainer, OptiTrainingArguments

    mod = _upstream.load("optitrainer")
    assert mod.Trainer is OptiTrainer
    assert mod.TrainingArguments is OptiTrainingArguments
