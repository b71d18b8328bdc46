"""Specification of optitrainer-optimi.

* ``stable_adamw`` trains to exactly transformers.Trainer's numbers where transformers is right;
* ``optim_args`` are typed: ``kahan_sum=False`` / ``decouple_lr=False`` mean False (transformers reads
  every non-empty string as True) and unknown keys are refused with the accepted ones;
* ``max_lr`` without ``decouple_lr=True`` is refused before training; ``decouple_lr`` alone uses the
  training arguments' learning rate as the peak;
* ``<name>_layerwise`` trains to exactly the standard run's numbers under a warmup + linear schedule;
* 2N straight == N + resume + N for every name, with ``weights_only`` checkpoints;
* every extra name (Lion, Adan, Ranger, RAdam, AdamW) trains and has typed options;
* Kahan summation works on CPU with bfloat16 weights; the guide's example runs.
"""

from __future__ import annotations

import ast
import copy
import runpy
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers import TrainerCallback

import optitrainer
from optitrainer import IncompatibleConfigError, InvalidOptimArgsError, OptiTrainer, OptiTrainingArguments
from optitrainer.testing import (
    SyntheticLMDataset,
    assert_learns,
    assert_same_run,
    max_param_diff,
    run_training,
    tiny_llama,
    training_arguments,
)

REPO = Path(__file__).resolve().parents[3]
NAMES = [
    "stable_adamw",
    "optimi_adamw",
    "optimi_radam",
    "optimi_lion",
    "optimi_adan",
    "optimi_ranger",
]
EXTRA = [n for n in NAMES if n != "stable_adamw"]
#: settings under which each optimizer visibly learns the tiny model in 20 steps
LEARN = {
    "stable_adamw": {"learning_rate": 1e-2},
    "optimi_adamw": {"learning_rate": 1e-2},
    "optimi_radam": {"learning_rate": 3e-2, "lr_scheduler_type": "constant", "adam_beta2": 0.99},
    "optimi_lion": {"learning_rate": 3e-3},
    "optimi_adan": {"learning_rate": 1e-2},
    "optimi_ranger": {"learning_rate": 3e-2, "lr_scheduler_type": "constant", "adam_beta2": 0.99},
}
pytestmark = pytest.mark.filterwarnings(
    "ignore:You are using weight_decay:UserWarning"
)  # optimi, decouple_lr
TF = {"trainer_cls": transformers.Trainer, "arguments_cls": transformers.TrainingArguments}


def _inner(trainer) -> torch.optim.Optimizer:
    """The optimizer the plugin built (accelerate wraps it once training started)."""
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)


def _trainer(optim: str, tmp_path, *, model=None, trainer_cls=OptiTrainer, arguments_cls=None, **kw):
    args = training_arguments(tmp_path, arguments_cls=arguments_cls, optim=optim, **kw)
    return trainer_cls(model=model or tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=16))


# --- 1. parity with transformers.Trainer --------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"weight_decay": 0.1, "adam_beta2": 0.95, "warmup_steps": 3},
        # values transformers reads right: "True" and a float
        {"weight_decay": 1e-4, "optim_args": "decouple_lr=True, max_lr=0.002, kahan_sum=True"},
    ],
    ids=["args", "decouple_lr"],
)
def test_stable_adamw_matches_transformers_trainer(tmp_path, settings):
    ref = run_training("stable_adamw", tmp_path / "ref", steps=20, **TF, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # kahan_sum=True on float32 weights: a no-op, said so
        ours = run_training("stable_adamw", tmp_path / "opti", steps=20, **settings)
    assert type(_inner(ours.trainer)) is type(_inner(ref.trainer))
    assert_same_run(ref, ours)  # identical losses and final parameters
    assert ours.learning_rates == ref.learning_rates


# --- 2. typed options ---------------------------------------------------------------------------------


def test_false_means_false_where_transformers_reads_true(tmp_path):
    optim_args = "kahan_sum=False, decouple_lr=False"
    theirs = _trainer("stable_adamw", tmp_path / "tf", optim_args=optim_args, **TF).create_optimizer()
    # transformers: bool("False") is True
    assert {(g["kahan_sum"], g["decouple_lr"]) for g in theirs.param_groups} == {(True, True)}

    ours = _trainer("stable_adamw", tmp_path / "opti", optim_args=optim_args).create_optimizer()
    assert {(g["kahan_sum"], g["decouple_lr"]) for g in ours.param_groups} == {(False, False)}
    # also when the user keeps plain transformers.TrainingArguments
    plain = _trainer(
        "stable_adamw",
        tmp_path / "plain",
        optim_args=optim_args,
        arguments_cls=transformers.TrainingArguments,
    ).create_optimizer()
    assert {(g["kahan_sum"], g["decouple_lr"]) for g in plain.param_groups} == {(False, False)}


def test_decouple_lr_false_string_changes_transformers_training_not_ours(tmp_path):
    """With weight_decay=0.1, transformers' "decouple_lr=False" decays the weights by ~10% a step."""
    s = {"weight_decay": 0.1, "steps": 4}
    tf_default = run_training("stable_adamw", tmp_path / "a", **TF, **s)
    tf_false = run_training("stable_adamw", tmp_path / "b", optim_args="decouple_lr=False", **TF, **s)
    assert max_param_diff(tf_default.params, tf_false.params) > 1e-2

    ours_default = run_training("stable_adamw", tmp_path / "c", **s)
    ours_false = run_training("stable_adamw", tmp_path / "d", optim_args="decouple_lr=False", **s)
    assert_same_run(ours_default, ours_false)
    assert_same_run(ours_default, tf_default)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_key_names_the_accepted_ones(tmp_path, name):
    with pytest.raises(InvalidOptimArgsError) as err:
        training_arguments(tmp_path, optim=name, optim_args="rnak=16")
    msg = str(err.value)
    assert "'rnak'" in msg
    for opt in optitrainer.get_optimizer(name).spec.options:
        assert f"{opt.name}=" in msg


def test_bad_values_are_refused_with_the_expected_type(tmp_path):
    cases = {
        ("stable_adamw", "kahan_sum=maybe"): "kahan_sum",
        ("stable_adamw", "max_lr=-1"): "max_lr",
        ("optimi_ranger", "k=2.5"): "k=",
        ("optimi_ranger", "alpha=1.5"): "alpha",
        ("optimi_adan", "betas=(0.9,0.99)"): "betas",
    }
    for (name, optim_args), key in cases.items():
        with pytest.raises(InvalidOptimArgsError, match=key):
            training_arguments(tmp_path, optim=name, optim_args=optim_args)


def test_max_lr_without_decouple_lr_is_refused_before_training(tmp_path):
    args = training_arguments(tmp_path, optim="stable_adamw", optim_args="max_lr=0.002")
    with pytest.raises(IncompatibleConfigError) as err:
        OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=16))
    assert "decouple_lr=True" in str(err.value) and "max_lr" in str(err.value)


@pytest.mark.parametrize("optim", ["stable_adamw", "stable_adamw_layerwise"])
def test_decouple_lr_alone_takes_the_learning_rate_as_peak(tmp_path, optim):
    """optimi does not need max_lr: it defaults to the learning rate the optimizer is built with."""
    trainer = _trainer(optim, tmp_path, optim_args="decouple_lr=True", learning_rate=3e-3, max_grad_norm=0)
    opt = trainer.create_optimizer()
    inner = [opt] if not hasattr(opt, "inner") else list(opt.inner.values())
    assert {(g["decouple_lr"], g["max_lr"]) for o in inner for g in o.param_groups} == {(True, 3e-3)}


def test_invalid_betas_are_refused_before_training(tmp_path):
    for name, kw, fix in [
        ("optimi_lion", {"adam_beta2": 1.0}, "adam_beta2"),
        ("optimi_adan", {"optim_args": "betas=(0.98,0.92,1.0)"}, "betas"),
    ]:
        args = training_arguments(tmp_path, optim=name, **kw)
        with pytest.raises(IncompatibleConfigError, match=fix):
            OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=16))


def test_kahan_sum_on_float32_weights_warns(tmp_path):
    args = training_arguments(tmp_path, optim="stable_adamw", optim_args="kahan_sum=True")
    with pytest.warns(UserWarning, match="kahan_sum=True does nothing"):
        OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=16))


# --- 3. layerwise == standard ---------------------------------------------------------------------------

LAYERWISE_CASES = [
    ("stable_adamw", {}),
    ("stable_adamw", {"optim_args": "decouple_lr=True", "weight_decay": 1e-3}),
    ("optimi_ranger", {"optim_args": "k=3"}),
    ("optimi_adan", {}),
    ("optimi_lion", {"learning_rate": 3e-3}),
]


@pytest.mark.parametrize(
    "name,settings", LAYERWISE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LAYERWISE_CASES)]
)
def test_layerwise_equals_standard_under_a_schedule(tmp_path, name, settings):
    s = {"max_grad_norm": 0.0, "warmup_steps": 3, "weight_decay": 0.1, "learning_rate": 1e-2, **settings}
    standard = run_training(name, tmp_path / "std", steps=12, **s)
    layerwise = run_training(f"{name}_layerwise", tmp_path / "lw", steps=12, **s)
    assert type(_inner(layerwise.trainer)).__name__ == "LayerwiseOptimizer"
    lrs = standard.learning_rates
    assert lrs[0] < lrs[2] > lrs[-1] > 0  # warmup then linear decay: the scheduled lr really moves
    assert layerwise.learning_rates == lrs
    assert_same_run(standard, layerwise)


# --- 4. exact resume ------------------------------------------------------------------------------------


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _stopping_trainer(step: int):
    class StoppingOptiTrainer(OptiTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(_StopAt(step))

    return StoppingOptiTrainer


@pytest.mark.parametrize("name", [*NAMES, "stable_adamw_layerwise"])
def test_resume_equals_uninterrupted(tmp_path, name):
    n = 3
    s = {"warmup_steps": 2, "weight_decay": 0.1, **LEARN[name.removesuffix("_layerwise")]}
    if name.endswith("_layerwise"):
        s["max_grad_norm"] = 0.0
    if name == "optimi_ranger":
        s["optim_args"] = "k=2"  # a Lookahead sync before and after the checkpoint
    straight = run_training(name, tmp_path / "straight", steps=2 * n, **s)
    # the same 2N-step schedule, stopped after N steps with a checkpoint
    run_training(
        name,
        tmp_path / "split",
        steps=2 * n,
        trainer_cls=_stopping_trainer(n),
        save_strategy="steps",
        save_steps=n,
        **s,
    )
    ckpt = tmp_path / "split" / f"checkpoint-{n}"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert state
    resumed = run_training(name, tmp_path / "split", steps=2 * n, resume_from_checkpoint=str(ckpt), **s)
    assert resumed.trainer.state.global_step == 2 * n
    assert_same_run(straight, resumed)


# --- 5. the extra names train and are typed -------------------------------------------------------------


@pytest.mark.parametrize("name", EXTRA)
def test_extra_optimizers_learn(tmp_path, name):
    result = run_training(name, tmp_path, steps=20, **LEARN[name])
    assert type(_inner(result.trainer)).__module__.startswith("optimi")
    assert_learns(result)


@pytest.mark.parametrize(
    "name,optim_args,expected",
    [
        ("optimi_lion", "decouple_lr=False, kahan_sum=false", {"decouple_lr": False, "kahan_sum": False}),
        ("optimi_lion", "decouple_lr=true, max_lr=0.01", {"decouple_lr": True, "max_lr": 0.01}),
        (
            "optimi_adan",
            "betas=(0.9,0.9,0.99), adam_wd=True",
            {"beta1": 0.9, "beta2": 0.9, "beta3": 0.99, "adam_wd": True, "kahan_sum": False},
        ),
        (
            "optimi_ranger",
            "k=3, alpha=0.25, decouple_wd=False",
            {"k": 3, "alpha": 0.25, "decouple_wd": False},
        ),
        ("optimi_radam", "decouple_wd=yes", {"decouple_wd": True}),
        ("optimi_radam", "decouple_wd=no, kahan_sum=None", {"decouple_wd": False, "kahan_sum": None}),
        ("optimi_adamw", "kahan_sum=0", {"kahan_sum": False}),
    ],
)
def test_extra_options_reach_the_optimizer_typed(tmp_path, name, optim_args, expected):
    trainer = _trainer(name, tmp_path, optim_args=optim_args, weight_decay=0.05, adam_beta1=0.8)
    opt = trainer.create_optimizer()
    for group in opt.param_groups:
        for key, value in expected.items():
            assert group[key] == value and type(group[key]) is type(value), (key, group[key])
        assert group["gradient_release"] is False
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]  # no decay on norms/biases
    if name != "optimi_adan":
        assert opt.param_groups[0]["beta1"] == 0.8  # betas from the training arguments


def test_aliases_and_layerwise_names_resolve(tmp_path):
    for alias, canonical in [("lion", "optimi_lion"), ("adan", "optimi_adan"), ("ranger", "optimi_ranger")]:
        resolved = optitrainer.get_optimizer(alias)
        assert resolved.spec.name == canonical and not resolved.layerwise
        assert resolved.provenance.distribution == "optitrainer-optimi"
        lw = optitrainer.get_optimizer(f"{alias}_layerwise")
        assert lw.spec.name == canonical and lw.layerwise
    args = OptiTrainingArguments(output_dir=str(tmp_path), optim="ranger", use_cpu=True, report_to="none")
    assert args.optim == "optimi_ranger"


def test_capabilities_are_honest():
    for name in NAMES:
        caps = optitrainer.get_optimizer(name).spec.capabilities
        assert caps.layerwise and not caps.requires_cuda and not caps.owns_backward
    # per-tensor RMS clipping is not the same algorithm on FSDP/ZeRO shards
    assert optitrainer.get_optimizer("stable_adamw").spec.capabilities.distributed == {"ddp"}


# --- low precision on CPU -------------------------------------------------------------------------------


def _one_step(trainer) -> torch.optim.Optimizer:
    opt = trainer.create_optimizer()
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return opt


def test_kahan_summation_runs_on_cpu_bf16_and_false_turns_it_off(tmp_path):
    def kahan_states(opt):
        return {s["kahan_comp"] is not None for s in opt.state.values()}

    bf16 = lambda: tiny_llama().to(torch.bfloat16)  # noqa: E731
    auto = _one_step(_trainer("stable_adamw", tmp_path / "a", model=bf16()))
    assert kahan_states(auto) == {True}
    assert {s["kahan_comp"].dtype for s in auto.state.values()} == {torch.bfloat16}
    off = _one_step(_trainer("stable_adamw", tmp_path / "b", model=bf16(), optim_args="kahan_sum=False"))
    assert kahan_states(off) == {False}
    # transformers cannot turn it off
    theirs = _one_step(
        _trainer("stable_adamw", tmp_path / "c", model=bf16(), optim_args="kahan_sum=False", **TF)
    )
    assert kahan_states(theirs) == {True}


def test_bf16_weights_train_on_cpu(tmp_path):
    model = tiny_llama().to(torch.bfloat16)  # Kahan summation on (auto)
    result = run_training(
        "stable_adamw", tmp_path, steps=20, model=model, learning_rate=1e-2, weight_decay=0.1
    )
    assert {p.dtype for p in result.params.values()} == {torch.bfloat16}
    assert_learns(result)


def test_checkpoint_written_with_triton_resumes_on_cpu(tmp_path):
    """optimi stores its Triton decision in the param groups; a CUDA checkpoint must still resume on CPU."""
    import optimi

    sd = _one_step(_trainer("stable_adamw", tmp_path / "a")).state_dict()
    for group in sd["param_groups"]:
        group["triton"] = True  # what a CUDA machine with Triton writes

    ours = _trainer("stable_adamw", tmp_path / "b").create_optimizer()
    ours.load_state_dict(copy.deepcopy(sd))
    assert {g["triton"] for g in ours.param_groups} == {False}
    for p in (p for g in ours.param_groups for p in g["params"]):
        p.grad = torch.full_like(p, 1e-3)
    ours.step()

    upstream = optimi.StableAdamW([{"params": g["params"]} for g in ours.param_groups], lr=1e-3)
    upstream.load_state_dict(copy.deepcopy(sd))
    with pytest.raises(NameError):  # optimi calls its Triton kernels, which do not exist here
        upstream.step()


# --- packaging and the guide ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["stable_adamw", "optimi_lion", "stable_adamw_layerwise"])
def test_cpu_training_where_triton_is_installed_runs_optimis_cpu_kernels(tmp_path, name, monkeypatch):
    """optimi 0.3.3 picks Triton from an empty parameter list: with Triton importable (any CUDA build of
    torch) it ran Triton kernels on CPU tensors and crashed ("0 active drivers"). The plugin decides on the
    real parameters, so the run is the one an installation without Triton gives, bit for bit."""
    import optimi.utils

    plain = run_training(name, tmp_path / "plain", steps=3)
    monkeypatch.setattr(optimi.utils, "HAS_TRITON", True)  # what torch's CUDA wheels bring along
    with_triton = run_training(name, tmp_path / "triton", steps=3)
    opt = with_triton.trainer.optimizer.optimizer
    groups = [g for o in getattr(opt, "inner", {None: opt}).values() for g in o.param_groups]
    assert groups and not any(g["triton"] for g in groups)
    assert_same_run(with_triton, plain)


def test_spec_module_imports_neither_torch_nor_optimi():
    """`optitrainer list` imports the spec module: only the plugin API and the stdlib at module level."""
    import optitrainer_optimi

    tree = ast.parse(Path(optitrainer_optimi.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top <= {"__future__", "typing", "warnings", "optitrainer"}, top


def test_guide_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example writes ./test-stable-adamw
    runpy.run_path(str(REPO / "examples" / "guide" / "stable_adamw.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "optimi.stableadamw.StableAdamW" in out
    assert "final loss:" in out
