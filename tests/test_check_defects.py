"""Each defect the conformance kit catches, proven on a small plugin that has it (tests/kit_defects).

Every defective plugin here passed the kit before it grew these checks (resume, scheduled lr, layerwise
exactness, refusals only); the controls (correct plugins with the same shape) must pass.
"""

from __future__ import annotations

import importlib.util

import pytest
from kit_defects import specs

from optitrainer import register
from optitrainer.kit import FAILED, NOT_RUNNABLE, PASSED, SKIPPED, plan_for, run_plan
from optitrainer.registry import REGISTRY


@pytest.fixture
def registered():
    names = []

    def add(*spec_objects):
        for spec in spec_objects:
            register(spec, replace=True)
            names.append(spec.name)

    yield add
    for name in names:
        REGISTRY.unregister(name)


def check(name: str, *checks: str, tmp_path) -> dict[str, object]:
    items, _ = plan_for([name], checks=list(checks))
    return {(r.optim, r.check): r for r in run_plan(items, tmp_path)}


def test_an_optimizer_that_does_not_learn_fails_and_a_correct_one_passes(registered, tmp_path):
    registered(specs.LION_MAXIMIZE, specs.SGD_MOMENTUM)
    lion = check("kd_lion_maximize", "learns", tmp_path=tmp_path / "lion")[("kd_lion_maximize", "learns")]
    assert lion.status == FAILED, lion
    assert "does not learn at any lr of the sweep" in lion.detail and "lr 0.001:" in lion.detail
    assert "sign error" in lion.detail
    # SGD with momentum does not learn at 1e-3 on the tiny model (0.3 % in 16 steps): the sweep goes on
    sgd = check("kd_sgd_momentum", "learns", tmp_path=tmp_path / "sgd")[("kd_sgd_momentum", "learns")]
    assert sgd.status == PASSED and "at lr 0.001" not in sgd.detail, sgd


def test_a_loss_that_spikes_and_comes_back_is_not_learning(registered, tmp_path):
    registered(specs.SPIKE_THEN_UNDO)
    result = check("kd_spike_then_undo", "learns", tmp_path=tmp_path)[("kd_spike_then_undo", "learns")]
    assert result.status == FAILED and "never above 1.5 x" in result.detail, result


def test_a_recommended_lr_is_the_one_the_kit_trains_at(registered, tmp_path):
    import dataclasses

    spec = dataclasses.replace(specs.SGD_MOMENTUM, name="kd_sgd_recommended", recommended_lr=1e-3)
    registered(spec)
    result = check("kd_sgd_recommended", "learns", tmp_path=tmp_path)[("kd_sgd_recommended", "learns")]
    # at its own (too small) recommended lr it does not learn, and no sweep rescues it
    assert (
        result.status == FAILED
        and "at its recommended_lr" in result.detail
        and "lr 0.01" not in result.detail
    )


def test_a_declared_learning_rate_range_must_learn_at_both_ends(registered, tmp_path):
    """A range is a claim the trainer's warning relies on: the kit trains at its ends."""
    import dataclasses

    claims = dataclasses.replace(
        specs.SGD_MOMENTUM, name="kd_sgd_range", recommended_lr=0.1, learning_rate_range=(1e-5, 0.1)
    )
    registered(claims)
    result = check("kd_sgd_range", "learns", tmp_path=tmp_path)[("kd_sgd_range", "learns")]
    assert result.status == FAILED, result
    assert "declares learning_rate_range=(1e-05, 0.1) but does not learn at 1e-05" in result.detail
    assert "optitrainer check kd_sgd_range --measure-lr" in result.detail


def test_measure_lr_prints_the_range_to_declare(registered, tmp_path, monkeypatch, capsys):
    """``optitrainer check NAME --measure-lr`` walks the grid from recommended_lr until the loss stays flat."""
    import dataclasses

    from optitrainer import cli
    from optitrainer.kit import learning
    from optitrainer.testing import conformance_cases

    monkeypatch.setattr(learning, "_GRID_REACH", 4)  # four grid steps each way: 0.02 … 0.002, 0.1 … 1
    registered(dataclasses.replace(specs.SGD_MOMENTUM, name="kd_sgd_measured", recommended_lr=0.05))
    assert cli.main(["check", "kd_sgd_measured", "--measure-lr"]) == 0
    out = capsys.readouterr().out
    assert (
        "kd_sgd_measured: learns at learning_rate " in out
        and "declare: OptimizerSpec(..., learning_rate_range=(" in out
    )
    low, high = (float(x) for x in out.split("learning_rate_range=(")[1].split(")")[0].split(", "))
    assert {low, high} <= {0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0} and low <= 0.05 <= high
    assert "; not at " in out  # SGD stops learning inside that reach (the walk found where)
    # what it printed is what the learns criterion says: both ends learn, the rates named after "not at" do not
    (case,) = [c for c in conformance_cases(["kd_sgd_measured"]) if c.optim == "kd_sgd_measured"]
    assert all(learning._run(case, tmp_path / f"end{lr:g}", lr, learning.LONG_STEPS)[0] for lr in (low, high))
    missed = out.split("; not at ")[1].split("\n")[0].split(" nor ") if "; not at " in out else []
    for lr in map(float, missed):
        assert not learning._run(case, tmp_path / f"miss{lr:g}", lr, learning.LONG_STEPS)[0], lr


def test_train_eval_modes_must_match_the_optimizer(registered, tmp_path):
    registered(specs.MODES_UNDECLARED, specs.MODES_CLAIMED)
    undeclared = check("kd_modes_undeclared", "train_eval_modes", tmp_path=tmp_path / "a")
    result = undeclared[("kd_modes_undeclared", "train_eval_modes")]
    assert result.status == FAILED and "does not declare Capabilities(train_eval_modes=True)" in result.detail
    claimed = check("kd_modes_claimed", "train_eval_modes", tmp_path=tmp_path / "b")
    result = claimed[("kd_modes_claimed", "train_eval_modes")]
    assert result.status == FAILED and "has no train()/eval() methods" in result.detail


def test_schedule_free_plugin_passes_the_modes_check(tmp_path):
    result = check("schedule_free_adamw", "train_eval_modes", tmp_path=tmp_path)
    assert result[("schedule_free_adamw", "train_eval_modes")].status == PASSED


def test_an_option_that_changes_nothing_fails(registered, tmp_path):
    registered(specs.DEAD_OPTION)
    result = check("kd_dead_option", "options", tmp_path=tmp_path)[("kd_dead_option", "options")]
    assert result.status == FAILED, result
    assert (
        "dampening (tried 0.5" in result.detail and "momentum" not in result.detail.split("nothing")[1][:40]
    )


def test_every_builtin_option_reaches_its_optimizer(tmp_path):
    for name in ("sgd", "rmsprop", "adafactor", "muon"):
        result = check(name, "options", tmp_path=tmp_path / name)[(name, "options")]
        assert result.status == PASSED, result


def test_a_typo_in_imports_fails_with_the_import_error_and_an_absent_upstream_skips(registered, tmp_path):
    registered(specs.IMPORT_TYPO, specs.ABSENT_UPSTREAM)
    typo = check("kd_import_typo", "imports", tmp_path=tmp_path)[("kd_import_typo", "imports")]
    assert typo.status == FAILED
    assert "import 'schedulfree'" in typo.detail and "ModuleNotFoundError" in typo.detail
    absent = check("kd_absent_upstream", "imports", "learns", tmp_path=tmp_path)
    for key in (("kd_absent_upstream", "imports"), ("kd_absent_upstream", "learns")):
        assert absent[key].status == SKIPPED
        assert "pip install 'optitrainer-kit-absent-upstream==1.0'" in absent[key].detail


def test_layerwise_exactness_resume_weights_only_and_scheduled_lr(registered, tmp_path):
    registered(specs.GLOBAL_NORM_LAYERWISE, specs.COUNTER_NOT_SAVED, specs.OBJECT_STATE, specs.FROZEN_LR)
    lw = check("kd_global_norm", "layerwise_exact", tmp_path=tmp_path / "lw")
    assert lw[("kd_global_norm_layerwise", "layerwise_exact")].status == FAILED
    counter = check("kd_counter_not_saved", "resume", tmp_path=tmp_path / "counter")
    assert counter[("kd_counter_not_saved", "resume")].status == FAILED
    assert "losses differ" in counter[("kd_counter_not_saved", "resume")].detail
    obj = check("kd_object_state", "resume", tmp_path=tmp_path / "obj")[("kd_object_state", "resume")]
    assert obj.status == FAILED and "Weights only load failed" in obj.detail, obj
    frozen = check("kd_frozen_lr", "scheduled_lr", tmp_path=tmp_path / "lr")[("kd_frozen_lr", "scheduled_lr")]
    assert frozen.status == FAILED and "ran at scheduled lr 0 but weights moved" in frozen.detail


def test_accumulation_must_equal_the_bigger_batch(registered, tmp_path):
    registered(specs.LAST_MICRO_BATCH)
    result = check("kd_last_micro_batch", "accumulation", tmp_path=tmp_path)[
        ("kd_last_micro_batch", "accumulation")
    ]
    assert result.status == FAILED and "gradient_accumulation_steps=2" in result.detail, result
    ok = check("sgd", "accumulation", tmp_path=tmp_path / "sgd")[("sgd", "accumulation")]
    assert ok.status == PASSED, ok


def test_accumulation_allows_what_the_update_makes_of_rounding_and_says_so(tmp_path):
    # AdaMuon orthogonalises then normalises per element: a start one rounding step away moves the
    # weights by a fifth of their movement, so reordered sums cannot agree to 5 %; the kit measures that
    pytest.importorskip("pytorch_optimizer")
    result = check("po_adamuon", "accumulation", tmp_path=tmp_path)[("po_adamuon", "accumulation")]
    assert result.status == PASSED and "amplifies rounding" in result.detail, result


def test_an_option_for_low_precision_weights_is_checked_on_bfloat16_weights(tmp_path):
    # FlashAdamW's master_weight_bits only means something for bf16/fp16 weights; upstream refuses it on
    # float32 ones, so the kit shows its effect on a bfloat16 copy of the model
    pytest.importorskip("pytorch_optimizer")
    result = check("po_flashadamw", "options", tmp_path=tmp_path)[("po_flashadamw", "options")]
    assert result.status == PASSED and "master_weight_bits=24" in result.detail, result
    assert "on bfloat16 weights (refused on float32 ones)" in result.detail


def test_fp16_is_not_passed_where_it_cannot_run(tmp_path):
    import torch

    result = check("adamw_torch", "fp16", tmp_path=tmp_path)[("adamw_torch", "fp16")]
    if torch.cuda.is_available():
        assert result.status == PASSED, result
    else:
        assert result.status == NOT_RUNNABLE and "only on a GPU" in result.detail, result


def test_refusals_call_the_plugins_validate(registered, tmp_path):
    registered(specs.VALIDATE_CRASHES)
    result = check("kd_validate_crashes", "refusals", tmp_path=tmp_path)[("kd_validate_crashes", "refusals")]
    assert result.status == FAILED and "validate(ctx) raised KeyError" in result.detail, result


def test_distributed_claims_run_in_one_launch(registered, tmp_path):
    """A fused-backward plugin claiming DDP whose hooks never average: the ranks drift apart."""
    registered(specs.FUSED_NO_AVERAGE, specs.FUSED)
    items, _ = plan_for(["kd_fused_no_average", "kd_fused"], checks=["distributed"])
    assert [i.check for i in items] == ["distributed:ddp", "distributed:ddp"] and len(items[0].batch) == 2
    results = {r.optim: r for r in run_plan(items, tmp_path)}
    assert results["kd_fused_no_average"].status == FAILED, results["kd_fused_no_average"]
    assert "the 2 ranks end" in results["kd_fused_no_average"].detail
    assert results["kd_fused"].status == PASSED, results["kd_fused"]


def test_a_deepspeed_run_does_not_turn_the_next_ddp_run_into_deepspeed(tmp_path):
    # one launch trains every (form, engine): a ZeRO run used to leave its configuration behind, and the
    # DDP run after it was refused as "DeepSpeed ZeRO-2 training" for a DDP-only optimizer
    pytest.importorskip("deepspeed")
    from optitrainer.kit.distributed import DistributedRun, run_distributed

    runs = [DistributedRun("adamw_torch", "zero2"), DistributedRun("muon", "ddp")]
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        # and an update that amplifies rounding (AdaMuon: 6e-3 from one process, as far as a start one
        # rounding step away lands) is judged against its own sensitivity, not 1e-4
        runs.append(DistributedRun("po_adamuon", "ddp"))
    results = {r.optim: r for r in run_distributed(runs, tmp_path)}
    assert results["muon"].status == PASSED, results["muon"]
    assert results["adamw_torch"].status == PASSED, results["adamw_torch"]
    if "po_adamuon" in results:
        assert results["po_adamuon"].status == PASSED, results["po_adamuon"]
        assert "amplifies rounding" in results["po_adamuon"].detail


def test_a_plugin_without_recommended_lr_is_judged_at_a_rate_its_validators_accept(registered, tmp_path):
    """A 0.1.0-style plugin whose validate_arguments refuses lr < 0.1 failed check_refusals ("refuses the
    default options": the kit validated at 1e-3); it is judged at the first rate of the sweep it accepts."""
    registered(specs.LEGACY_LR_FLOOR)
    results = check("kd_legacy_lr_floor", "refusals", "learns", tmp_path=tmp_path)
    for key in [("kd_legacy_lr_floor", "refusals"), ("kd_legacy_lr_floor", "learns")]:
        assert results[key].status == PASSED, results[key]
