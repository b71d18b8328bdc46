"""``OptiTrainer.get_optimizer_cls_and_kwargs``: scripts and frameworks build every plugin's optimizer.

transformers' ``Trainer.create_optimizer`` turns the answer into an optimizer (``cls(groups, **kwargs)``,
``"params"`` replacing the groups, or the factory form ``cls()(model, **kwargs)``). Each installed name's
answer, so built by ``transformers.Trainer`` itself, must step exactly as the optimizer OptiTrainer
builds: the same weights, bit for bit, after three steps.
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from transformers import Trainer
from transformers.trainer_optimizer import is_optimizer_factory

from optitrainer import IncompatibleConfigError, OptiTrainer, list_optimizers
from optitrainer.optimizer_class import PluginOptimizerFactory
from optitrainer.registry import REGISTRY
from optitrainer.testing import (
    SyntheticLMDataset,
    assert_same_run,
    conformance_cases,
    run_training,
    tiny_llama,
    training_arguments,
)

NAMES = sorted(
    i.name
    for i in list_optimizers()
    if i.installed and "fused-backward" not in i.capabilities and "cuda-only" not in i.capabilities
)


@functools.cache
def _kit_cases() -> dict:
    return {c.optim: c for c in conformance_cases()}


def _case_args(name: str) -> dict:
    """What the conformance kit trains ``name`` with (target modules, a learning rate it accepts)."""
    case = _kit_cases()[name]
    if case.skip or case.error:
        pytest.skip(f"{name}: {case.skip or case.error}")
    return case.args


def _arguments(tmp_path, name: str, **overrides):
    try:
        return training_arguments(tmp_path, optim=name, **{**_case_args(name), **overrides})
    except IncompatibleConfigError as exc:
        pytest.skip(f"{name} refuses the kit's default arguments: {exc}")


def _steps(model, optimizer, batch, n: int = 3) -> dict[str, torch.Tensor]:
    if hasattr(optimizer, "train"):  # schedule-free: both trainers switch it to train mode first
        optimizer.train()
    for step in range(n):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        torch.manual_seed(step)  # optimizers that draw random numbers draw the same ones
        optimizer.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "no-model"])
@pytest.mark.parametrize("name", NAMES)
def test_transformers_builds_from_the_answer_what_optitrainer_builds(name, with_model, tmp_path):
    args = _arguments(tmp_path, name)
    dataset = SyntheticLMDataset(n=8)
    batch = {
        k: torch.stack([dataset[i][k] for i in range(4)]) for k in ("input_ids", "labels", "attention_mask")
    }
    ours = OptiTrainer(model=tiny_llama(), args=args, train_dataset=dataset)
    model = tiny_llama()
    answer = OptiTrainer.get_optimizer_cls_and_kwargs(args, model if with_model else None)
    theirs = Trainer(
        model=model, args=args, train_dataset=dataset, optimizer_cls_and_kwargs=copy.copy(answer)
    )
    a, b = ours.create_optimizer(), theirs.create_optimizer()
    assert type(a) is type(b)
    want, got = _steps(ours.model, a, batch), _steps(theirs.model, b, batch)
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, (
        f"{name}: {answer[0].__name__} built from the answer steps otherwise: {different[:3]}"
    )


def test_a_plain_class_answer_carries_the_plugins_defaults_and_optim_args(tmp_path):
    args = training_arguments(
        tmp_path, optim="sgd", optim_args="momentum=0.8,nesterov=True", learning_rate=0.05
    )
    cls, kwargs = OptiTrainer.get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.SGD
    assert (kwargs["lr"], kwargs["momentum"], kwargs["nesterov"]) == (0.05, 0.8, True)


def test_a_plugin_grouping_its_parameters_hands_them_over(tmp_path):
    """GaLore puts the target weights in a group of their own: the answer replaces the Trainer's groups."""
    pytest.importorskip("galore_torch")
    model = tiny_llama()
    args = _arguments(tmp_path, "galore_adamw")
    cls, kwargs = OptiTrainer.get_optimizer_cls_and_kwargs(args, model)
    assert cls.__name__ == "GaLoreAdamW"
    projected = [g for g in kwargs["params"] if "rank" in g]
    wanted = {
        id(p) for n, p in model.named_parameters() if any(t in n for t in ("attn", "mlp")) and p.dim() == 2
    }
    assert {id(p) for g in projected for p in g["params"]} == wanted
    # without the model the target modules are unknown: the factory form builds it on the model later
    assert OptiTrainer.get_optimizer_cls_and_kwargs(args) == (PluginOptimizerFactory, {"training_args": args})


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("adamw_torch_layerwise", "runs one optimizer per parameter, stepped from gradient hooks"),
        ("lomo", "updates the weights inside its own backward pass"),
    ],
)
def test_what_only_optitrainer_runs_is_refused_with_the_reason(name, why, tmp_path):
    if not REGISTRY.resolve(name, check_installed=False).spec.capabilities.layerwise and name.endswith(
        "layerwise"
    ):
        pytest.skip("no layerwise form")
    pytest.importorskip("lomo_optim") if name == "lomo" else None
    args = training_arguments(tmp_path, optim=name, max_grad_norm=0.0)
    with pytest.raises(IncompatibleConfigError) as info:
        OptiTrainer.get_optimizer_cls_and_kwargs(args, tiny_llama())
    assert why in str(info.value) and "Train with optitrainer.OptiTrainer" in str(info.value)


@pytest.mark.parametrize("name", ["adagrad", "galore_adamw", "muon"])
def test_a_plain_trainer_given_the_answer_trains_as_optitrainer_does(name, tmp_path):
    """The whole loop: ``transformers.Trainer(optimizer_cls_and_kwargs=answer)`` against OptiTrainer."""
    try:
        args = _arguments(tmp_path, name)
    except Exception as exc:  # noqa: BLE001 -- torch too old (muon: refused when the arguments are built)
        pytest.skip(str(exc).splitlines()[0])
    kit = _case_args(name)
    ours = run_training(name, tmp_path / "ours", steps=6, **kit)
    model = tiny_llama()
    answer = OptiTrainer.get_optimizer_cls_and_kwargs(args, model)

    def plain_trainer(**kw):
        return Trainer(optimizer_cls_and_kwargs=answer, **kw)

    theirs = run_training(name, tmp_path / "theirs", steps=6, trainer_cls=plain_trainer, model=model, **kit)
    assert_same_run(theirs, ours)
    assert not isinstance(theirs.trainer, OptiTrainer)


def test_names_only_transformers_knows_get_transformers_answer(tmp_path, monkeypatch):
    """Without a plugin for the name, the answer is transformers' own (its optimizer, its kwargs)."""
    monkeypatch.setattr(REGISTRY, "_find", lambda name: None)  # as if no plugin provided any name
    args = training_arguments(tmp_path, optim="adamw_torch", learning_rate=0.01)
    assert OptiTrainer.get_optimizer_cls_and_kwargs(args) == Trainer.get_optimizer_cls_and_kwargs(args)


def test_the_answer_for_a_plugin_with_callbacks_says_what_to_add(tmp_path, caplog):
    pytest.importorskip("schedulefree")
    args = _arguments(tmp_path, "schedule_free_adamw", lr_scheduler_type="constant")
    with caplog.at_level(logging.WARNING, logger="optitrainer"):
        cls, _ = OptiTrainer.get_optimizer_cls_and_kwargs(args)
    assert is_optimizer_factory(cls) is False
    assert "callbacks" in caplog.text and "must add them itself" in caplog.text
