"""The plugin author's own tests, as written for optitrainer 0.1.0 (kept unchanged: see ../README.md)."""

import pytest

from optitrainer import IncompatibleConfigError, InvalidOptimArgsError, OptiTrainer, OptiTrainingArguments
from optitrainer.testing import (
    SyntheticLMDataset,
    assert_same_run,
    conformance_test,
    run_training,
    tiny_llama,
)

test_conformance = conformance_test(dist="legacy-layerwise-adam")


def test_options_are_parsed_and_reach_the_optimizer(tmp_path):
    run = run_training("legacy_adam", tmp_path, steps=2, optim_args="betas=0.8:0.95, eps=1e-6, amsgrad=true")
    assert run.trainer.args.optimizer_choice.options == {"betas": (0.8, 0.95), "eps": 1e-6, "amsgrad": True}
    for group in run.trainer.optimizer.optimizer.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["amsgrad"] is True


def test_an_eps_out_of_bounds_names_the_type_and_bounds():
    with pytest.raises(
        InvalidOptimArgsError, match=r"eps='-1' is not valid; expected finite float in \[0, 1\]"
    ):
        OptiTrainingArguments("unused", optim="legacy_adam", optim_args="eps=-1", report_to="none")


def test_betas_of_the_wrong_length_are_refused():
    with pytest.raises(InvalidOptimArgsError, match=r"expected tuple of 2 float in \[0, 1\]"):
        OptiTrainingArguments(
            "unused", optim="legacy_adam", optim_args="betas=(0.9,0.99,0.5)", report_to="none"
        )


def test_a_beta_of_one_is_refused_by_validate(tmp_path):
    args = OptiTrainingArguments(
        str(tmp_path), optim="legacy_adam", optim_args="betas=(0.9,1.0)", report_to="none"
    )
    with pytest.raises(IncompatibleConfigError, match="never forgets the first gradient"):
        OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset())


def test_layerwise_equals_standard(tmp_path):
    kw = {"steps": 5, "learning_rate": 1e-3, "weight_decay": 0.1, "optim_args": "amsgrad=true"}
    std = run_training("legacy_adam", tmp_path / "std", **kw)
    lw = run_training("legacy_adam_layerwise", tmp_path / "lw", **kw)
    assert_same_run(lw, std)
