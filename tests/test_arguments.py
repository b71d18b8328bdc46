"""Arguments: any registered name, typed optim_args, every bad input refused before a model exists."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser, TrainingArguments

from optitrainer import (
    IncompatibleConfigError,
    InvalidOptimArgsError,
    OptiTrainingArguments,
    UnknownOptimizerError,
    register,
    with_optitrainer,
)
from optitrainer.options import parse_optim_args, split_optim_args
from optitrainer.plugin import Capabilities, OptimizerSpec, Option
from optitrainer.registry import REGISTRY


def _sgd_factory(ctx):
    import torch

    return torch.optim.SGD(ctx.param_groups(), lr=ctx.lr)


TYPED = OptimizerSpec(
    name="typed_test_opt",
    factory=_sgd_factory,
    summary="options of every type",
    options=(
        Option("rank", int, 128, "projection rank", low=1),
        Option("scale", float, 0.25, "update scale", low=0.0),
        Option("kahan_sum", bool, None, "Kahan summation"),
        Option("betas", tuple, (0.9, 0.999), "moment coefficients"),
        Option("proj_type", str, "std", "projection", choices=("std", "reverse_std", "left", "right")),
        Option("max_lr", float, None, "maximum lr"),
    ),
)


@pytest.fixture(scope="module", autouse=True)
def typed_spec():
    register(TYPED, replace=True)
    yield
    REGISTRY.unregister(TYPED.name)


def args(**kw):
    return OptiTrainingArguments(output_dir="unused", report_to="none", use_cpu=True, **kw)


def test_transformers_rejects_what_optitrainer_accepts():
    with pytest.raises(ValueError):
        TrainingArguments(output_dir="unused", optim="typed_test_opt")
    assert args(optim="typed_test_opt").optim == "typed_test_opt"


def test_default_optimizer_is_transformers_default():
    assert args().optim == TrainingArguments(output_dir="unused").optim


def test_string_form_is_typed():
    a = args(
        optim="typed_test_opt",
        optim_args="rank=64, scale=0.1, kahan_sum=False, betas=(0.8,0.95), proj_type=left, max_lr=none",
    )
    opts = a.optimizer_choice.options
    assert opts == {
        "rank": 64,
        "scale": 0.1,
        "kahan_sum": False,
        "betas": (0.8, 0.95),
        "proj_type": "left",
        "max_lr": None,
    }
    assert type(opts["rank"]) is int and opts["kahan_sum"] is False


def test_dict_form_and_defaults():
    a = args(optim="typed_test_opt", optim_args={"rank": 8, "kahan_sum": "true", "betas": [0.5, 0.6]})
    opts = a.optimizer_choice.options
    assert opts["rank"] == 8 and opts["kahan_sum"] is True and opts["betas"] == (0.5, 0.6)
    assert opts["scale"] == 0.25 and opts["proj_type"] == "std"


@pytest.mark.parametrize("text", ["TRUE", "yes", "1", "on"])
def test_booleans_true(text):
    assert (
        args(optim="typed_test_opt", optim_args=f"kahan_sum={text}").optimizer_choice.options["kahan_sum"]
        is True
    )


@pytest.mark.parametrize("text", ["False", "false", "no", "0", "off"])
def test_booleans_false(text):
    # transformers' own handlers do bool("False") == True for some optimizers
    assert (
        args(optim="typed_test_opt", optim_args=f"kahan_sum={text}").optimizer_choice.options["kahan_sum"]
        is False
    )


def test_unknown_key_lists_accepted_keys_with_defaults():
    with pytest.raises(InvalidOptimArgsError) as err:
        args(optim="typed_test_opt", optim_args="rnak=16")
    msg = str(err.value)
    assert "unknown key 'rnak' (did you mean 'rank'?)" in msg
    assert "rank=128" in msg and "scale=0.25" in msg and "proj_type='std'" in msg
    assert "optitrainer info typed_test_opt" in msg
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("rank=sixty", "rank='sixty' is not valid; expected int"),
        ("rank=2.5", "expected int"),
        ("rank=0", "expected int in [1, inf)"),
        ("scale=-1", "expected float in [0, inf), finite"),
        ("scale=-1", "expected float in [0, inf"),  # how optitrainer's first commits began it
        ("scale=-1", "scale='-1' is not valid; expected finite float in [0, inf)"),  # as 0.1.0 wrote it
        ("max_lr=nan", "max_lr='nan' is not valid; expected finite float | None"),  # as 0.1.0 wrote it
        ("scale=nan", "scale='nan' is not valid; expected finite float in [0, inf)"),
        ("scale=inf", "expected float in [0, inf), finite"),
        ("max_lr=nan", "expected float | None, finite"),
        ("betas=(0.9,0.99,0.999)", "expected tuple of 2 float"),
        ("kahan_sum=maybe", "expected bool | None"),
        ("proj_type=diagonal", "expected one of 'std', 'reverse_std', 'left', 'right'"),
        ("betas=(0.9)", "expected tuple of 2 float"),
        ("scale=none", "expected float in [0, inf), finite"),
        ("rank", "cannot read 'rank'"),
        ("rank=1, rank=2", "given twice"),
    ],
)
def test_bad_values_name_key_value_and_expectation(raw, expected):
    with pytest.raises(InvalidOptimArgsError) as err:
        args(optim="typed_test_opt", optim_args=raw)
    assert expected in str(err.value)


def test_optimizer_without_options_refuses_any_key():
    with pytest.raises(InvalidOptimArgsError, match="'adamw_torch' accepts no optim_args"):
        args(optim="adamw_torch", optim_args="foo=1")


def test_unknown_optimizer_fails_at_construction():
    with pytest.raises(UnknownOptimizerError, match="Did you mean: 'sgd'"):
        args(optim="sgdd")


def test_aliases_resolve_to_the_canonical_name():
    register(
        OptimizerSpec(name="aliased_test_opt", factory=_sgd_factory, summary="s", aliases=("my_alias",)),
        replace=True,
    )
    try:
        assert args(optim="my_alias").optim == "aliased_test_opt"
    finally:
        REGISTRY.unregister("aliased_test_opt")


def test_all_conflicts_reported_at_once_before_training():
    register(
        OptimizerSpec(
            name="picky_test_opt",
            factory=_sgd_factory,
            summary="s",
            capabilities=Capabilities(
                gradient_accumulation=False, gradient_clipping=False, needs_target_modules=True
            ),
        ),
        replace=True,
    )
    try:
        with pytest.raises(IncompatibleConfigError) as err:
            args(optim="picky_test_opt", gradient_accumulation_steps=4, max_grad_norm=1.0)
        msg = str(err.value)
        assert "set optim_target_modules" in msg
        assert "gradient_accumulation_steps=4" in msg and "set gradient_accumulation_steps=1" in msg
        assert "max_grad_norm=1.0" in msg and "set max_grad_norm=0" in msg
    finally:
        REGISTRY.unregister("picky_test_opt")


def test_cuda_only_optimizer_refused_without_cuda():
    register(
        OptimizerSpec(
            name="cuda_test_opt",
            factory=_sgd_factory,
            summary="s",
            capabilities=Capabilities(requires_cuda=True),
        ),
        replace=True,
    )
    try:
        with pytest.raises(IncompatibleConfigError, match="needs a CUDA device"):
            args(optim="cuda_test_opt")
    finally:
        REGISTRY.unregister("cuda_test_opt")


def test_layerwise_clipping_with_accumulation_is_accepted_at_transformers_defaults():
    # transformers' default max_grad_norm=1.0: accumulation in layerwise mode no longer means no clipping
    assert args(optim="adamw_torch_layerwise", gradient_accumulation_steps=2).max_grad_norm == 1.0
    assert args(optim="adamw_torch_layerwise", max_grad_norm=0.0, gradient_accumulation_steps=2)
    # under FSDP2 the 'rebuild' scheme runs a clipped step's forward/backward twice: refused with
    # accumulation; 'hold' (the default there) runs it once (tests/test_fsdp2*.py train it)
    from types import SimpleNamespace

    from optitrainer.compat import argument_conflicts
    from optitrainer.engine import Engine

    resolved, fsdp2 = REGISTRY.resolve("adamw_torch_layerwise"), Engine.for_mode("fsdp2")
    for scheme, refused in (("rebuild", True), ("hold", False), ("auto", False)):
        setup = SimpleNamespace(
            gradient_accumulation_steps=2, max_grad_norm=1.0, optim_args=None, layerwise_clipping=scheme
        )
        conflicts = [c for c in argument_conflicts(resolved, setup, fsdp2) if "under FSDP" in c]
        assert bool(conflicts) == refused, (scheme, conflicts)
        if refused:
            assert "use layerwise_clipping='hold' (the default under FSDP), max_grad_norm=0" in conflicts[0]


def test_command_line_through_hf_argument_parser():
    parser = HfArgumentParser(OptiTrainingArguments)
    (a,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "unused",
            "--optim",
            "typed_test_opt",
            "--optim_args",
            "rank=64, scale=0.1",
            "--report_to",
            "none",
        ]
    )
    assert a.optim == "typed_test_opt"
    assert a.optimizer_choice.options["rank"] == 64 and a.optimizer_choice.options["scale"] == 0.1
    with pytest.raises(UnknownOptimizerError):
        parser.parse_args_into_dataclasses(["--output_dir", "unused", "--optim", "nope_opt"])


def test_several_target_module_patterns_on_the_command_line():
    parser = HfArgumentParser(OptiTrainingArguments)
    common = ["--output_dir", "unused", "--optim", "galore_adamw", "--report_to", "none"]
    (a,) = parser.parse_args_into_dataclasses([*common, "--optim_target_modules", ".*attn.*", ".*mlp.*"])
    assert a.optim_target_modules == [".*attn.*", ".*mlp.*"]
    (b,) = parser.parse_args_into_dataclasses([*common, "--optim_target_modules", "all-linear"])
    assert b.optim_target_modules == "all-linear"  # the special value, as transformers reads it
    c = OptiTrainingArguments(
        "unused", optim="galore_adamw", optim_target_modules=r".*attn.*", report_to="none"
    )
    assert c.optim_target_modules == r".*attn.*"  # Python keeps a str a str


def test_mixin_for_other_argument_classes():
    SFTConfig = pytest.importorskip("trl", reason="TRL is a test extra (not in the floor run)").SFTConfig

    OptiSFTConfig = with_optitrainer(SFTConfig)
    cfg = OptiSFTConfig(
        output_dir="unused",
        optim="typed_test_opt",
        optim_args="rank=4",
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    assert isinstance(cfg, SFTConfig)
    assert cfg.optimizer_choice.options["rank"] == 4
    with pytest.raises(InvalidOptimArgsError):
        OptiSFTConfig(
            output_dir="unused", optim="typed_test_opt", optim_args="rank=x", use_cpu=True, bf16=False
        )


def test_set_optimizer_accepts_any_name():
    a = args().set_optimizer(name="typed_test_opt", learning_rate=0.01)
    assert a.optim == "typed_test_opt" and a.learning_rate == 0.01


def test_split_keeps_tuples_together():
    assert split_optim_args("betas=(0.9, 0.99), rank=3") == {"betas": "(0.9, 0.99)", "rank": "3"}
    assert parse_optim_args(TYPED, "betas=0.9:0.95")["betas"] == (0.9, 0.95)


EDGE_OPTIONS = OptimizerSpec(
    name="edge_options_opt",
    factory=lambda ctx: __import__("torch").optim.SGD(ctx.param_groups(), lr=ctx.lr),
    summary="options at their edges",
    options=(
        Option("d_coef", float, 1.0, "scale of the estimate", low=0.0, low_exclusive=True),
        Option("beta", float, 0.9, "a coefficient below one", low=0.0, high=1.0, high_exclusive=True),
        Option("betas", tuple, (0.9, 0.99, 0.999), "three coefficients"),
        Option("milestones", tuple, None, "two step counts", length=2, element=int),
        Option("warmup", int, 10, "steps of warmup, or None for none", nullable=True),
        Option("tag", str, "plain", "a free string"),
    ),
)


@pytest.fixture
def edge_spec():
    register(EDGE_OPTIONS, replace=True)
    yield EDGE_OPTIONS
    REGISTRY.unregister(EDGE_OPTIONS.name)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("d_coef=nan", "d_coef='nan' is not valid; expected finite float in (0, inf)"),
        (
            "beta=1",
            "beta='1' is not valid; expected finite float in [0, 1); expected float in [0, 1), finite",
        ),
        ("d_coef=0", "expected float in (0, inf), finite"),
        ("beta=1", "expected float in [0, 1), finite"),
        ("betas=(0.9,0.99)", "expected tuple of 3 float"),
        ("milestones=(1.5,2)", "expected tuple of 2 int | None"),
        ("milestones=(1,2,3)", "expected tuple of 2 int"),
    ],
)
def test_nan_exclusive_bounds_and_tuple_shape_are_refused(edge_spec, raw, expected):
    with pytest.raises(InvalidOptimArgsError) as err:
        args(optim="edge_options_opt", optim_args=raw)
    assert expected in str(err.value)


def test_nullable_options_quoted_strings_and_typed_tuples(edge_spec):
    opts = args(
        optim="edge_options_opt",
        optim_args="tag='a, b=c', warmup=none, milestones=(10,20), beta=0.5, d_coef=\"2\"",
    ).optimizer_choice.options
    assert opts["tag"] == "a, b=c" and opts["warmup"] is None and opts["milestones"] == (10, 20)
    assert opts["beta"] == 0.5 and opts["d_coef"] == 2.0
    assert (
        args(optim="edge_options_opt", optim_args={"warmup": None}).optimizer_choice.options["warmup"] is None
    )


def _refuse_tiny_lr(training_args, options):
    if training_args.learning_rate < 1e-2:
        return [
            f"learning_rate={training_args.learning_rate:g} makes this method a no-op; set learning_rate=1.0"
        ]
    return []


ADAPTIVE = OptimizerSpec(
    name="adaptive_lr_opt",
    factory=lambda ctx: __import__("torch").optim.SGD(ctx.param_groups(), lr=ctx.lr),
    summary="a method meant to run at lr 1.0",
    recommended_lr=1.0,
    validate_arguments=_refuse_tiny_lr,
    capabilities=Capabilities(gradient_accumulation=False),
)


@pytest.fixture
def adaptive_spec():
    register(ADAPTIVE, replace=True)
    yield ADAPTIVE
    REGISTRY.unregister(ADAPTIVE.name)


def test_validate_arguments_runs_when_the_arguments_are_built_with_the_other_conflicts(adaptive_spec):
    with pytest.raises(IncompatibleConfigError) as err:
        args(optim="adaptive_lr_opt", learning_rate=5e-5, gradient_accumulation_steps=2)
    msg = str(err.value)
    assert "learning_rate=5e-05 makes this method a no-op; set learning_rate=1.0" in msg
    assert "gradient_accumulation_steps=2" in msg  # reported at once, not one by one
    assert args(optim="adaptive_lr_opt", learning_rate=1.0).optim == "adaptive_lr_opt"


def test_learning_rate_far_from_the_recommended_one_is_warned_about(adaptive_spec, caplog):
    with caplog.at_level("WARNING", logger="optitrainer"):
        args(optim="adaptive_lr_opt", learning_rate=200.0)
        args(optim="adaptive_lr_opt", learning_rate=0.05)  # 20 times away: within reason
    warned = [r.getMessage() for r in caplog.records if "meant to run at" in r.getMessage()]
    assert warned == [
        "optitrainer: optim='adaptive_lr_opt' is meant to run at learning_rate=1 (<in-process>); "
        "learning_rate=200 is 200 times larger. Set learning_rate=1 unless you know this is what you want."
    ]


def test_recommended_lr_must_be_a_positive_number():
    with pytest.raises(ValueError, match="recommended_lr must be a positive number"):
        OptimizerSpec(name="bad_lr_opt", factory=lambda ctx: None, summary="x", recommended_lr=0.0)


def test_a_measured_learning_rate_range_sets_where_the_warning_starts(adaptive_spec, caplog):
    """Prodigy-like: 20 times below its recommended rate it does not learn at all (issue 18's 0.05)."""
    import dataclasses

    measured = dataclasses.replace(ADAPTIVE, name="measured_lr_opt", learning_rate_range=(0.2, 20.0))
    register(measured, replace=True)
    try:
        with caplog.at_level("WARNING", logger="optitrainer"):
            for lr in (0.05, 0.2, 1.0, 20.0, 50.0):
                args(optim="measured_lr_opt", learning_rate=lr)
    finally:
        REGISTRY.unregister("measured_lr_opt")
    warned = [r.getMessage() for r in caplog.records if "learned only at" in r.getMessage()]
    assert warned == [
        f"optitrainer: optim='measured_lr_opt' learned only at learning_rate 0.2 to 20 in its plugin's "
        f"measurement (<in-process>; optitrainer check measured_lr_opt --measure-lr), and learning_rate={lr} "
        f"is {where} that: the loss may not move {how}. Set learning_rate=1 unless you know this is what you want."
        for lr, where, how in (("0.05", "below", "at all"), ("50", "above", "down"))
    ]


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ((0.0, 1.0), "needs 0 < low <= high"),
        ((2.0, 1.0), "needs 0 < low <= high"),
        ((2.0, 5.0), "lies outside"),
    ],
)
def test_a_learning_rate_range_must_hold_the_recommended_rate(bounds, message):
    with pytest.raises(ValueError, match=message):
        OptimizerSpec(
            name="bad_range",
            factory=lambda ctx: None,
            summary="x",
            recommended_lr=1.0,
            learning_rate_range=bounds,
        )


def test_prodigy_20_times_below_its_rate_is_warned_about(caplog):
    """Issue 18: --learning_rate 0.05 trained 40 steps without learning and nothing was said."""
    pytest.importorskip("prodigyopt")
    with caplog.at_level("WARNING", logger="optitrainer"):
        args(optim="prodigy", learning_rate=0.05, lr_scheduler_type="constant")
    assert "learned only at learning_rate 0.2 to 50" in caplog.text and "is below that" in caplog.text
