"""The plugin author's own tests, as written for optitrainer 0.1.0 (kept unchanged: see ../README.md)."""

import pytest

from optitrainer import IncompatibleConfigError, InvalidOptimArgsError, OptiTrainer, OptiTrainingArguments
from optitrainer.testing import SyntheticLMDataset, conformance_test, tiny_llama

test_conformance = conformance_test(dist="legacy-prodigy")


def test_small_learning_rates_are_refused(tmp_path):
    args = OptiTrainingArguments(str(tmp_path), optim="legacy_prodigy", learning_rate=1e-3, report_to="none")
    with pytest.raises(IncompatibleConfigError, match="far too small for Prodigy"):
        OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset())


def test_bad_d_coef_names_the_type():
    with pytest.raises(InvalidOptimArgsError, match="expected float"):
        OptiTrainingArguments("unused", optim="legacy_prodigy", optim_args="d_coef=-1", report_to="none")
