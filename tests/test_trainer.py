"""OptiTrainer around the loop: fused-backward plugins, the layerwise engine, truthful logs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import optitrainer.trainer as trainer_module
from optitrainer import OptiTrainer, list_optimizers, register
from optitrainer.layerwise import LayerwiseOptimizer
from optitrainer.plugin import BackwardContext, Capabilities, OptimizerSpec
from optitrainer.registry import REGISTRY
from optitrainer.testing import (
    SyntheticLMDataset,
    assert_same_run,
    max_param_diff,
    run_training,
    tiny_llama,
    training_arguments,
)


class FusedSGD(torch.optim.SGD):
    """A real optimizer-in-backward: each parameter is updated from its own hook during backward."""

    seen_lrs: list[float]

    def fused_backward(self, loss: torch.Tensor, lr: float) -> None:
        self.seen_lrs.append(lr)
        handles = []
        for p in (p for g in self.param_groups for p in g["params"]):

            def hook(param):
                with torch.no_grad():
                    param.add_(param.grad, alpha=-lr)
                param.grad = None

            handles.append(p.register_post_accumulate_grad_hook(hook))
        try:
            loss.backward()
        finally:
            for h in handles:
                h.remove()


def _fused_factory(ctx):
    opt = FusedSGD(ctx.param_groups(), lr=ctx.lr)
    opt.seen_lrs = []
    return opt


def _fused_backward(b: BackwardContext):
    b.optimizer.fused_backward(b.loss, b.lr)
    return 123.0 if b.max_grad_norm > 0 else None  # what a plugin measured, passed through verbatim


FUSED = OptimizerSpec(
    name="fused_test_sgd",
    factory=_fused_factory,
    summary="test",
    capabilities=Capabilities(owns_backward=True, gradient_accumulation=False),
    backward=_fused_backward,
)


@pytest.fixture
def fused_spec():
    register(FUSED, replace=True)
    yield
    REGISTRY.unregister(FUSED.name)


def test_plugin_owned_backward_gets_the_scheduled_lr(tmp_path, fused_spec):
    run = run_training("fused_test_sgd", tmp_path, steps=6, learning_rate=0.1, max_grad_norm=0.0)
    opt = run.trainer.optimizer.optimizer
    assert opt.seen_lrs == pytest.approx(run.learning_rates)
    assert opt.seen_lrs[0] > opt.seen_lrs[-1]  # linear decay reached the update
    assert run.grad_norms == [None] * 6  # nothing measured → no grad_norm, never a fake 0.0
    # the same updates as plain SGD through the stock path
    ref = run_training(
        "sgd", tmp_path / "ref", steps=6, learning_rate=0.1, max_grad_norm=0.0, weight_decay=0.0
    )
    assert run.losses == ref.losses
    assert max_param_diff(run.params, ref.params) < 1e-6


def test_plugin_measured_grad_norm_is_logged(tmp_path, fused_spec):
    run = run_training("fused_test_sgd", tmp_path, steps=2, learning_rate=0.1, max_grad_norm=1.0)
    assert run.grad_norms == [123.0, 123.0]


def test_trainer_source_holds_no_optimizer_names():
    source = Path(trainer_module.__file__).read_text()
    names = {r.name for r in list_optimizers()} | {
        "lomo",
        "adalomo",
        "galore",
        "apollo",
        "schedule_free",
        "grokadamw",
    }
    found = [n for n in names if re.search(rf"\b{re.escape(n)}\b", source)]
    assert not found, f"optimizer names leaked into the trainer: {found}"


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd", "rmsprop", "adafactor"])
def test_layerwise_equals_standard_under_a_schedule(optim, tmp_path):
    kw = {"steps": 20, "max_grad_norm": 0.0, "weight_decay": 0.1, "warmup_steps": 4}
    std = run_training(optim, tmp_path / "std", **kw)
    lw = run_training(f"{optim}_layerwise", tmp_path / "lw", **kw)
    assert_same_run(lw, std)
    assert lw.learning_rates == std.learning_rates  # logged lr is the scheduled one...
    inner = lw.trainer.optimizer.optimizer.inner
    last_lr = std.trainer.lr_scheduler.get_last_lr()[0]
    # ...and the lr the per-parameter optimizers applied last is the last scheduled one
    assert all(
        g["lr"] == pytest.approx(std.learning_rates[-1]) for o in inner.values() for g in o.param_groups
    )
    assert last_lr < std.learning_rates[-1]
    assert lw.grad_norms == [None] * 20


def test_layerwise_with_gradient_accumulation_matches_standard(tmp_path):
    kw = {
        "steps": 8,
        "max_grad_norm": 0.0,
        "gradient_accumulation_steps": 3,
        "per_device_train_batch_size": 2,
    }
    std = run_training("adamw_torch", tmp_path / "std", **kw)
    lw = run_training("adamw_torch_layerwise", tmp_path / "lw", **kw)
    assert_same_run(lw, std)


def test_layerwise_clipping_is_exact_and_logs_the_real_norm(tmp_path):
    kw = {"steps": 10, "max_grad_norm": 0.5, "learning_rate": 5e-3}
    std = run_training("adamw_torch", tmp_path / "std", **kw)
    lw = run_training("adamw_torch_layerwise", tmp_path / "lw", **kw)
    assert all(n > 0.5 for n in std.grad_norms)  # clipping really happened
    assert lw.grad_norms == pytest.approx(std.grad_norms, rel=1e-6)
    assert_same_run(lw, std, atol=1e-6)


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_layerwise_clipping_after_accumulation_equals_the_standard_form(tmp_path, optim):
    """Clip and step after the last micro-batch's backward (every gradient is alive then anyway)."""
    kw = {"steps": 6, "max_grad_norm": 0.2, "learning_rate": 5e-3, "gradient_accumulation_steps": 3}
    kw["per_device_train_batch_size"] = 2
    std = run_training(optim, tmp_path / "std", **kw)
    lw = run_training(f"{optim}_layerwise", tmp_path / "lw", **kw)
    assert all(n > 0.2 for n in std.grad_norms)  # clipping really happened
    assert lw.grad_norms == pytest.approx(std.grad_norms, rel=1e-6)
    assert_same_run(lw, std, atol=1e-6)


def test_layerwise_clipping_runs_the_training_step_once_per_micro_batch(tmp_path):
    """The norm pass and the update pass share the step's graph: forward, loss and counters run once.

    (TRL's trainers count tokens, buffer and generate inside ``training_step``/``compute_loss``.)
    With dropout on, the standard form and the layerwise form still see the same masks.
    """
    calls = []

    class CountingTrainer(OptiTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            calls.append(int(inputs["input_ids"][0, 0]))
            return super().compute_loss(model, inputs, *args, **kwargs)

    kw = {"steps": 6, "max_grad_norm": 0.5, "learning_rate": 5e-3}
    dropout = {"attention_dropout": 0.2}
    std = run_training("adamw_torch", tmp_path / "std", model=tiny_llama(**dropout), **kw)
    lw = run_training(
        "adamw_torch_layerwise",
        tmp_path / "lw",
        model=tiny_llama(**dropout),
        trainer_cls=CountingTrainer,
        **kw,
    )
    assert len(calls) == 6, f"compute_loss ran {len(calls)} times for 6 micro-batches"
    assert len(set(calls)) > 1  # different batches, each seen once
    assert lw.grad_norms == pytest.approx(std.grad_norms, rel=1e-6)
    assert_same_run(lw, std, atol=1e-6)


def test_layerwise_keeps_at_most_one_gradient_alive(tmp_path):
    model = tiny_llama()
    trainer = OptiTrainer(
        model=model,
        args=training_arguments(tmp_path, optim="sgd_layerwise", max_steps=1, max_grad_norm=0.0),
        train_dataset=SyntheticLMDataset(),
    )
    alive: list[int] = []

    def count(_):
        alive.append(sum(p.grad is not None for p in model.parameters()))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(count)  # runs after the engine's hook
    trainer.train()
    assert alive and max(alive) <= 1


def test_layerwise_hooks_are_removed_after_training_and_state_is_by_name(tmp_path):
    run = run_training("adamw_torch_layerwise", tmp_path, steps=3, save_strategy="steps", save_steps=3)
    engine = run.trainer.optimizer.optimizer
    assert isinstance(engine, LayerwiseOptimizer) and engine._handles == []
    sd = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    names = {n for n, p in run.trainer.model.named_parameters()}
    assert set(sd["layerwise"]) == names
    assert all(s["state"] for s in sd["layerwise"].values())  # moments saved for every parameter


def test_layerwise_resume_is_exact(tmp_path):
    straight = run_training("adamw_torch_layerwise", tmp_path / "s", steps=8, max_grad_norm=0.0)
    run_training(
        "adamw_torch_layerwise",
        tmp_path / "h",
        steps=8,
        max_grad_norm=0.0,
        save_strategy="steps",
        save_steps=4,
    )
    resumed = run_training(
        "adamw_torch_layerwise",
        tmp_path / "h",
        steps=8,
        max_grad_norm=0.0,
        resume_from_checkpoint=str(tmp_path / "h" / "checkpoint-4"),
    )
    assert_same_run(resumed, straight)


def test_plain_training_arguments_get_plugins_and_typed_options(tmp_path):
    from transformers import TrainingArguments

    from optitrainer import InvalidOptimArgsError

    args = training_arguments(
        tmp_path, arguments_cls=TrainingArguments, optim="sgd", optim_args="momentum=0.9"
    )
    trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset())
    opt = trainer.create_optimizer()
    assert opt.param_groups[0]["momentum"] == 0.9  # typed by optitrainer's spec, not transformers' handler
    bad = training_arguments(
        tmp_path, arguments_cls=TrainingArguments, optim="sgd", optim_args="momentun=0.9"
    )
    with pytest.raises(InvalidOptimArgsError, match="did you mean 'momentum'"):
        OptiTrainer(model=tiny_llama(), args=bad, train_dataset=SyntheticLMDataset())


def test_user_supplied_optimizer_is_left_alone(tmp_path):
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    args = training_arguments(tmp_path, optim="adamw_torch", max_steps=2)
    trainer = OptiTrainer(model=model, args=args, train_dataset=SyntheticLMDataset(), optimizers=(opt, sched))
    trainer.train()
    assert trainer.optimizer.optimizer is opt
