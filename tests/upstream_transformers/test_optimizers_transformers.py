"""transformers' tests/trainer/test_trainer_optimizers.py with plain ``transformers.Trainer``: the baseline."""

from upstream_transformers import _upstream

globals().update(_upstream.test_cases("transformers", "test_trainer_optimizers"))


def test_the_upstream_optimizer_module_runs_plain_trainer():
    from transformers.trainer import Trainer
    from transformers.training_args import TrainingArguments

    mod = _upstream.load("transformers", "test_trainer_optimizers")
    assert mod.Trainer is Trainer
    assert mod.TrainingArguments is TrainingArguments
