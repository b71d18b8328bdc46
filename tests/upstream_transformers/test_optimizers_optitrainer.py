"""transformers' tests/trainer/test_trainer_optimizers.py with ``Trainer`` = ``optitrainer.OptiTrainer``."""

from upstream_transformers import _upstream

globals().update(_upstream.test_cases("optitrainer", "test_trainer_optimizers"))


def test_the_upstream_optimizer_module_runs_optitrainer():
    from optitrainer import OptiTrainer, OptiTrainingArguments

    mod = _upstream.load("optitrainer", "test_trainer_optimizers")
    assert mod.Trainer is OptiTrainer
    assert mod.TrainingArguments is OptiTrainingArguments


# The plugin imports bitsandbytes.optim when it first builds an optimizer; importing it now keeps the
# outcome of test_bnb_not_available_* (an expected difference, see _upstream.EXPECTED_DIFFERENCES)
# independent of which tests ran before it.
try:
    import optitrainer_bitsandbytes._optim  # noqa: F401
except ImportError:  # bitsandbytes absent: those tests are not generated at all
    pass
