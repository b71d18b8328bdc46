"""The plugin author's own tests, as written for optitrainer 0.1.0 (kept unchanged: see ../README.md)."""

import math

import pytest

from optitrainer import IncompatibleConfigError, OptiTrainingArguments
from optitrainer.testing import assert_learns, conformance_test, max_param_diff, run_training

test_conformance = conformance_test(dist="legacy-fused-sgd")


def test_trains_and_the_loss_falls(tmp_path):
    run = run_training("legacy_fused_sgd", tmp_path, steps=30, learning_rate=0.5, max_grad_norm=0.0)
    assert_learns(run)


def test_same_updates_as_torch_sgd_on_one_process(tmp_path):
    kw = {"steps": 6, "learning_rate": 0.1, "max_grad_norm": 0.0, "weight_decay": 0.1, "warmup_steps": 2}
    fused = run_training("legacy_fused_sgd", tmp_path / "fused", **kw)
    ref = run_training("sgd", tmp_path / "ref", **kw)
    assert fused.losses == ref.losses
    assert fused.learning_rates == ref.learning_rates
    assert max_param_diff(fused.params, ref.params) == 0.0
    # the norm measured in the hooks is the one the stock path computes
    assert all(math.isfinite(n) for n in fused.grad_norms)
    assert fused.grad_norms == pytest.approx(ref.grad_norms, rel=1e-5)


def test_gradient_accumulation_is_refused(tmp_path):
    with pytest.raises(IncompatibleConfigError, match="cannot accumulate gradients"):
        OptiTrainingArguments(
            str(tmp_path), optim="legacy_fused_sgd", gradient_accumulation_steps=2, max_grad_norm=0.0
        )


def test_clipping_is_refused(tmp_path):
    with pytest.raises(
        IncompatibleConfigError, match="cannot clip gradients truthfully; set max_grad_norm=0"
    ):
        OptiTrainingArguments(str(tmp_path), optim="legacy_fused_sgd", max_grad_norm=1.0)
