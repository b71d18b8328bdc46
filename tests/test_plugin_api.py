"""The plugin API's promises that are not about one optimizer: log_values, capability defaults."""

from __future__ import annotations

import pytest
import torch

from optitrainer import register
from optitrainer.plugin import Capabilities, OptimizerSpec
from optitrainer.registry import REGISTRY
from optitrainer.testing import run_training


def _sgd(ctx):
    return torch.optim.SGD(ctx.param_groups(), lr=ctx.lr)


def _log_lr(optimizer):
    # a plugin reads its own optimizer's groups (a KeyError on the layerwise facade before the fix)
    return {
        "plugin_lr": optimizer.param_groups[0]["lr"],
        "plugin_class": float(type(optimizer) is torch.optim.SGD),
    }


LOGGING = OptimizerSpec(
    name="logging_sgd",
    factory=_sgd,
    summary="SGD that logs from its own optimizer",
    capabilities=Capabilities(layerwise=True),
    log_values=_log_lr,
)


@pytest.fixture
def logging_spec():
    register(LOGGING, replace=True)
    yield
    REGISTRY.unregister(LOGGING.name)


@pytest.mark.parametrize("optim", ["logging_sgd", "logging_sgd_layerwise"])
def test_log_values_receives_the_optimizer_the_factory_built(logging_spec, optim, tmp_path):
    run = run_training(optim, tmp_path, steps=3, learning_rate=0.1, lr_scheduler_type="linear")
    logged = [h for h in run.trainer.state.log_history if "loss" in h]
    assert [h["plugin_class"] for h in logged] == [1.0, 1.0, 1.0]
    scheduled = [h["learning_rate"] for h in logged]
    if optim.endswith("_layerwise"):
        # each inner optimizer takes the scheduled lr in its hook: it holds the lr of the step just taken
        assert [h["plugin_lr"] for h in logged] == pytest.approx(scheduled)
    else:
        # the scheduler has already advanced the (one) optimizer's groups when the step is logged
        assert [h["plugin_lr"] for h in logged] == pytest.approx(scheduled[1:] + [0.0])


def test_capability_defaults_claim_only_what_the_trainer_guarantees():
    plain = Capabilities()
    assert plain.gradient_accumulation and plain.fp16 and plain.engines == {"ddp"}
    fused = Capabilities(owns_backward=True)
    # a fused-backward plugin updates inside backward: nothing is claimed for it by default
    assert not fused.gradient_accumulation and not fused.fp16 and fused.engines == frozenset()
    assert Capabilities(owns_backward=True, fp16=True, gradient_accumulation=True).fp16
