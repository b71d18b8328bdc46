"""The distributed engine is read from every place that can choose it, and refusals come before step 1."""

from __future__ import annotations

import pytest

from optitrainer import IncompatibleConfigError, OptiTrainingArguments
from optitrainer.compat import describe_engines, supported_engines
from optitrainer.engine import Engine, engine_from_arguments
from optitrainer.registry import REGISTRY

ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}


def args(**kw):
    return OptiTrainingArguments("out", report_to="none", **kw)


def test_deepspeed_argument_gives_its_zero_stage():
    assert engine_from_arguments(args(optim="adamw_torch", deepspeed=ZERO3)) == Engine(
        "deepspeed", 1, zero_stage=3, source="deepspeed="
    )


def test_accelerate_deepspeed_environment_is_seen(monkeypatch):
    """`accelerate launch` with a DeepSpeed config sets these variables, not `deepspeed=`."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    engine = engine_from_arguments(args(optim="adamw_torch"))
    assert (engine.kind, engine.mode, str(engine)) == ("deepspeed", "zero1", "DeepSpeed ZeRO-1")
    with pytest.raises(
        IncompatibleConfigError, match=r"DeepSpeed ZeRO-1 training \(from accelerate's DeepSpeed config\)"
    ):
        args(optim="galore_adamw", optim_target_modules="all-linear")


def test_fsdp_version_is_read():
    engine = engine_from_arguments(args(optim="adamw_torch", fsdp="full_shard", fsdp_config={"version": 2}))
    assert engine.mode == "fsdp2"


def test_refused_before_any_model_with_engine_reason_and_fix():
    with pytest.raises(IncompatibleConfigError) as info:
        args(optim="muon", deepspeed=ZERO3)
    text = str(info.value)
    assert "DeepSpeed ZeRO-3 training (from deepspeed=): muon supports DDP" in text
    assert "ZeRO flattens" in text and "launch with DDP" in text


def test_every_conflict_at_once_with_the_engine():
    with pytest.raises(IncompatibleConfigError) as info:
        args(optim="lomo", deepspeed=ZERO3, gradient_accumulation_steps=2)
    text = str(info.value)
    assert "gradient_accumulation_steps=2" in text and "DeepSpeed ZeRO-3" in text


@pytest.mark.parametrize(
    "name,expected",
    [
        ("adamw_torch", {"ddp", "zero0", "zero1", "zero2", "zero3", "fsdp1", "fsdp2"}),
        ("adamw_torch_layerwise", {"ddp", "fsdp2"}),  # the layerwise engine: DDP and FSDP2 only
        ("muon", {"ddp"}),
        ("adafactor_layerwise", {"ddp"}),
        ("galore_adamw_layerwise", {"ddp"}),
        ("schedule_free_adamw", {"ddp"}),
    ],
)
def test_supported_engines(name, expected):
    assert supported_engines(REGISTRY.resolve(name, check_installed=False)) == expected


def test_layerwise_refusal_points_to_the_standard_form():
    from optitrainer.compat import engine_conflict

    resolved = REGISTRY.resolve("adamw_torch_layerwise", check_installed=False)
    text = engine_conflict(resolved, Engine("deepspeed", 2, zero_stage=2, source="deepspeed="))
    assert "gradient hook" in text and "use optim='adamw_torch'" in text
    assert engine_conflict(resolved, Engine("fsdp", 2, fsdp_version=2, source="x")) is None
    assert describe_engines(frozenset({"ddp", "zero1", "zero2", "fsdp2"})) == "DDP, DeepSpeed ZeRO-1/2, FSDP2"


def test_a_plugin_that_says_nothing_claims_ddp_only():
    from optitrainer.plugin import Capabilities

    assert Capabilities().engines == {"ddp"}
    assert Capabilities(owns_backward=True).engines == frozenset()  # its hooks must average gradients
    assert Capabilities(distributed=frozenset({"deepspeed"})).engines == {"zero0", "zero1", "zero2", "zero3"}
    with pytest.raises(ValueError, match="unknown engine"):
        Capabilities(distributed=frozenset({"zero4"}))


def test_deepspeed_not_installed_says_what_to_install(monkeypatch):
    """Without the package transformers fails with "object.__init__() takes exactly one argument"."""
    import sys

    from optitrainer import EngineNotInstalledError

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without deepspeed looks like
    with pytest.raises(
        EngineNotInstalledError,
        match=r"asks for DeepSpeed ZeRO-3, but the deepspeed package is not installed: pip install 'optitrainer\[deepspeed\]'",
    ):
        args(optim="adamw_torch", deepspeed=ZERO3)
