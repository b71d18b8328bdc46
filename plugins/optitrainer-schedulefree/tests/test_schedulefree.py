"""The specification of optitrainer-schedulefree.

Every trainer run is a tiny Llama on CPU float32; runs shared by several tests are cached per module.
"""

from __future__ import annotations

import ast
import logging
import runpy
import warnings
from pathlib import Path
from types import SimpleNamespace

import optitrainer_schedulefree
import pytest
import schedulefree
import torch
import transformers
from optitrainer_schedulefree.optim import ScheduleFreeAdamW, ScheduleFreeRAdam, ScheduleFreeSGD
from optitrainer_schedulefree.trainer_callback import ScheduleFreeCallback
from safetensors.torch import load_file
from transformers import TrainerCallback

from optitrainer import IncompatibleConfigError, OptiTrainer, OptiTrainingArguments, get_optimizer
from optitrainer.plugin import BuildContext
from optitrainer.testing import (
    SyntheticLMDataset,
    assert_same_run,
    max_param_diff,
    run_training,
    tiny_llama,
    training_arguments,
)

NAMES = ["schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd"]
CLASSES = {
    "schedule_free_adamw": (ScheduleFreeAdamW, schedulefree.AdamWScheduleFree),
    "schedule_free_radam": (ScheduleFreeRAdam, schedulefree.RAdamScheduleFree),
    "schedule_free_sgd": (ScheduleFreeSGD, schedulefree.SGDScheduleFree),
}
HF = {"trainer_cls": transformers.Trainer, "arguments_cls": transformers.TrainingArguments}
CONSTANT = {"lr_scheduler_type": "constant"}
# evaluations every 3 steps, checkpoints every 4: checkpoint-12 comes right after an evaluation
EVAL_AND_SAVE = {
    "eval_strategy": "steps",
    "eval_steps": 3,
    "save_strategy": "steps",
    "save_steps": 4,
    "per_device_eval_batch_size": 8,
}
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices: one thread is ~10x faster than two fighting over a busy CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(key, name, **overrides)``: a 20-step run, trained once per module."""
    cache = {}

    def get(key: str, name: str, *, reference: bool = False, steps: int = 20, **overrides):
        if reference:
            skip_if_transformers_cannot_build_schedulefree()
        ident = (key, name, reference)
        if ident not in cache:
            who = "transformers" if reference else "optitrainer"
            out = tmp_path_factory.mktemp(f"{key}-{name}-{who}")
            if "eval_strategy" in overrides:
                overrides.setdefault("eval_dataset", SyntheticLMDataset(n=8, seed=1))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[ident] = run_training(
                    name, out, steps=steps, log_level="error", **(HF if reference else {}), **overrides
                )
            cache[ident].output_dir = out
        return cache[ident]

    return get


# -- helpers ----------------------------------------------------------------------------------------


def skip_if_transformers_cannot_build_schedulefree() -> None:
    """transformers before 5.4 on Python 3.10 cannot read schedulefree's version: the wheel has no
    top_level.txt, which 3.10's ``packages_distributions`` needs, and ``Trainer`` crashes on "N/A". The
    reference run then cannot exist (OptiTrainer is unaffected: it does not ask transformers)."""
    from packaging.version import InvalidVersion, Version
    from transformers.utils.import_utils import _is_package_available

    try:
        Version(_is_package_available("schedulefree", return_version=True)[1])
    except InvalidVersion:
        pytest.skip(
            f"transformers {transformers.__version__}'s Trainer cannot build schedule-free optimizers on "
            "this Python (it reads schedulefree's version as 'N/A'): no reference run"
        )


def raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's AcceleratedOptimizer


def momentum(group) -> float:
    return group["momentum"] if "momentum" in group else group["betas"][0]


def param_names(trainer) -> dict[int, str]:
    return {id(p): n for n, p in trainer.model.named_parameters()}


def x_from_y(trainer, y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The eval-mode weights upstream's ``eval()`` computes from train-mode weights ``y``."""
    opt, names, out = raw(trainer.optimizer), param_names(trainer), {}
    for group in opt.param_groups:
        for p in group["params"]:
            n, z = names[id(p)], opt.state[p].get("z")
            out[n] = y[n].clone() if z is None else y[n].clone().lerp_(z, 1 - 1 / momentum(group))
    return out


def stashed_y(trainer) -> dict[str, torch.Tensor]:
    """Our optimizer in eval mode keeps the exact train-mode weights in its state."""
    opt, names = raw(trainer.optimizer), param_names(trainer)
    assert not opt.param_groups[0]["train_mode"]
    return {names[id(p)]: opt.state[p]["y"].clone() for g in opt.param_groups for p in g["params"]}


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def final_x(trainer) -> dict[str, torch.Tensor]:
    """The averaged weights x a trainer ended on, whichever mode its optimizer is in."""
    params = weights(trainer)
    return x_from_y(trainer, params) if raw(trainer.optimizer).param_groups[0]["train_mode"] else params


def checkpoint(out: Path, step: int):
    """(weights by name, optimizer state dict) of a checkpoint; the state loads with weights_only=True."""
    folder = out / f"checkpoint-{step}"
    return load_file(folder / "model.safetensors"), torch.load(folder / "optimizer.pt", weights_only=True)


def checkpoint_y_z(trainer, state_dict) -> tuple[dict, dict, dict]:
    """Per parameter name: stashed y, z, and the interpolation weight to x, from a saved optimizer state."""
    names = [param_names(trainer)[id(p)] for g in raw(trainer.optimizer).param_groups for p in g["params"]]
    y, z, w = {}, {}, {}
    for saved_group in state_dict["param_groups"]:
        for index in saved_group["params"]:
            state = state_dict["state"][index]
            name = names[index]
            y[name], z[name], w[name] = state.get("y"), state["z"], 1 - 1 / momentum(saved_group)
    return y, z, w


def tiny_problem(seed: int = 0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]


def build_pair(name: str, **kwargs):
    ours_cls, upstream_cls = CLASSES[name]
    a, b = tiny_problem(), tiny_problem()
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]  # noqa: E731
    return (ours_cls(groups(a), lr=0.05, **kwargs), a), (upstream_cls(groups(b), lr=0.05, **kwargs), b)


def fake_step(opt, params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


# -- the optimizer classes ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_update_numbers_are_upstreams(name):
    kwargs = {} if name == "schedule_free_radam" else {"warmup_steps": 3}
    (ours, a), (upstream, b) = build_pair(name, **kwargs)
    ours.train(), upstream.train()
    for step in range(8):
        fake_step(ours, a, step), fake_step(upstream, b, step)
        for p, q in zip(a, b):
            assert torch.equal(p, q), f"step {step}: weights differ from upstream {type(upstream).__name__}"
            assert torch.equal(ours.state[p]["z"], upstream.state[q]["z"])
        assert ours.param_groups[0]["scheduled_lr"] == upstream.param_groups[0]["scheduled_lr"]
    ours.eval(), upstream.eval()  # and the averaged weights x too
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("name", NAMES)
def test_mode_switches_are_exact_where_upstreams_round(name):
    (ours, a), (upstream, b) = build_pair(name)
    ours.train(), upstream.train()
    for step in range(8):  # past RAdam's silent first steps
        fake_step(ours, a, step), fake_step(upstream, b, step)
    y = [p.detach().clone() for p in a]
    ours.eval(), upstream.eval()
    assert all(torch.equal(p, q) for p, q in zip(a, b)), "eval() must compute upstream's x"
    x = [p.detach().clone() for p in a]
    for _ in range(5):
        ours.train(), upstream.train()
        assert all(torch.equal(p, q) for p, q in zip(a, y)), "train() must give back the exact y"
        ours.eval(), upstream.eval()
        assert all(torch.equal(p, q) for p, q in zip(a, x)), "and eval() the same x again"
    ours.train(), upstream.train()
    assert all("y" not in ours.state[p] for p in a), "the stash lives only while in eval mode"
    drift = max(float((p.detach() - q).abs().max()) for p, q in zip(b, y))
    assert drift > 0, "upstream's switches round: the test must see it (else it proves nothing)"


def test_train_rebuilds_y_when_weights_changed_in_eval_mode(caplog):
    (ours, a), _ = build_pair("schedule_free_adamw")
    ours.train()
    for step in range(3):
        fake_step(ours, a, step)
    stale_y = [p.detach().clone() for p in a]
    ours.eval()
    with torch.no_grad():
        a[0].add_(0.01)  # e.g. load_best_model_at_end loaded other weights
    expected = [p.detach().clone().lerp_(ours.state[p]["z"], 1 - 0.9) for p in a]  # upstream's x -> y
    expected[1] = stale_y[1]  # the untouched parameter gets its exact y back
    with caplog.at_level(logging.WARNING, logger="optitrainer.schedulefree"):
        ours.train()
    assert all(torch.equal(p, e) for p, e in zip(a, expected))
    assert not torch.equal(a[0], stale_y[0]), "a stale y must never overwrite weights loaded in eval mode"
    assert "changed while the optimizer was in eval mode" in caplog.text


def test_eval_mode_state_dict_rebuilds_both_weights(tmp_path):
    (ours, a), _ = build_pair("schedule_free_adamw")
    ours.train()
    for step in range(3):
        fake_step(ours, a, step)
    y = [p.detach().clone() for p in a]
    ours.eval()
    x = [p.detach().clone() for p in a]
    torch.save(ours.state_dict(), tmp_path / "optimizer.pt")
    state = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert all("y" in s and "z" in s for s in state["state"].values())
    # a fresh process: new weights loaded with x (what the checkpoint's model file holds)
    (fresh, c), _ = build_pair("schedule_free_adamw")
    with torch.no_grad():
        for p, v in zip(c, x):
            p.copy_(v)
    fresh.load_state_dict(state)
    assert not fresh.param_groups[0]["train_mode"]
    fresh.train()
    assert all(torch.equal(p, v) for p, v in zip(c, y))
    ours.train()
    fake_step(fresh, c, 99), fake_step(ours, a, 99)
    assert all(torch.equal(p, q) for p, q in zip(a, c)), "the next step too"


# -- parity with transformers.Trainer ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_parity_with_transformers(runs, name):
    ref = runs("plain", name, reference=True, **CONSTANT)
    ours = runs("plain", name, **CONSTANT)
    assert_same_run(ref, ours, params=False)
    # transformers ends in train mode (y), optitrainer in eval mode (x): compare both, bit for bit
    assert raw(ref.trainer.optimizer).param_groups[0]["train_mode"]
    assert not raw(ours.trainer.optimizer).param_groups[0]["train_mode"]
    assert max_param_diff(x_from_y(ref.trainer, ref.params), ours.params) == 0.0
    assert max_param_diff(ref.params, stashed_y(ours.trainer)) == 0.0
    assert type(raw(ours.trainer.optimizer)) is CLASSES[name][0]


class AppliedLearningRate(TrainerCallback):
    """Reads, from the update itself, the learning rate each step applied: z_new = z - lr * direction."""

    def __init__(self):
        self.applied = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = raw(optimizer)
        self.params = [p for p in opt.param_groups[0]["params"] if p.grad is not None]
        self.z_before = [opt.state[p].get("z", p).detach().clone() for p in self.params]

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = raw(optimizer)
        moved = torch.cat([(zb - opt.state[p]["z"]).flatten() for p, zb in zip(self.params, self.z_before)])
        direction = torch.cat([p.grad.flatten() for p in self.params])  # upstream's step rewrites it in place
        self.applied.append(
            float(moved.double() @ direction.double() / (direction.double() @ direction.double()))
        )


@pytest.mark.parametrize("name", NAMES)
def test_logged_learning_rate_is_the_applied_one(tmp_path, name):
    """warmup_steps=5 with the default linear schedule: transformers applies the warmup twice and logs
    the scheduler's rate; optitrainer trains the same numbers and logs the rate the update applied."""
    skip_if_transformers_cannot_build_schedulefree()
    logged, applied, finals = {}, {}, {}
    for who, classes in (("transformers", HF), ("optitrainer", {})):
        probe = AppliedLearningRate()
        kwargs = {"arguments_cls": classes.get("arguments_cls")} if classes else {}
        args = training_arguments(tmp_path / who, optim=name, warmup_steps=5, log_level="error", **kwargs)
        trainer_cls = classes.get("trainer_cls", OptiTrainer)
        trainer = trainer_cls(
            model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(), callbacks=[probe]
        )
        if who == "optitrainer":
            with pytest.warns(UserWarning, match='lr_scheduler_type="constant"'):
                trainer.train()
        else:
            trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
        logged[who], applied[who] = [h["learning_rate"] for h in history], probe.applied
        finals[who] = ([h["loss"] for h in history], final_x(trainer))
    assert finals["transformers"][0] == finals["optitrainer"][0], "same losses"
    assert max_param_diff(finals["transformers"][1], finals["optitrainer"][1]) == 0.0, "same weights"
    assert applied["transformers"] == pytest.approx(applied["optitrainer"], rel=1e-6, abs=1e-12)
    assert logged["optitrainer"] == pytest.approx(applied["optitrainer"], rel=1e-4, abs=1e-9)
    assert logged["transformers"] != pytest.approx(applied["transformers"], rel=1e-4, abs=1e-9)
    if name != "schedule_free_radam":  # the warmup twice: step 3 applies 0.4 * lr * 3/5, not 0.4 * lr
        assert applied["optitrainer"][2] == pytest.approx(1e-3 * 0.4 * 0.6, rel=1e-4)
        assert logged["transformers"][2] == pytest.approx(1e-3 * 0.4)


def build_context(name: str, tmp_path, **overrides) -> BuildContext:
    args = training_arguments(tmp_path, optim=name, **overrides)
    spec = get_optimizer(name).spec
    options = {o.name: o.default for o in spec.options}
    return BuildContext(model=tiny_llama(), args=args, options=options, name=spec.name)


def test_build_warns_unless_the_schedule_is_constant(tmp_path):
    with pytest.warns(UserWarning, match=r"warmup is applied twice.*lr_scheduler_type=\"constant\""):
        get_optimizer("schedule_free_sgd").spec.factory(
            build_context("schedule_free_sgd", tmp_path, warmup_steps=5)
        )
    with pytest.warns(UserWarning, match=r"ignores warmup_steps=5.*lr_scheduler_type=\"constant\""):
        get_optimizer("schedule_free_radam").spec.factory(
            build_context("schedule_free_radam", tmp_path, warmup_steps=5, lr_scheduler_type="cosine")
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = get_optimizer("schedule_free_adamw").spec.factory(
            build_context("schedule_free_adamw", tmp_path, warmup_steps=5, **CONSTANT)
        )
    assert opt.param_groups[0]["warmup_steps"] == 5


def test_warmup_ratio_is_steps_not_a_tenfold_first_step(tmp_path):
    """transformers passes warmup_steps=0.1 (a ratio) to the optimizer as is: its first step applies
    lr / 0.1 = 10 x lr (with the recommended constant schedule). optitrainer converts the ratio to
    steps as the scheduler does: ceil(0.1 * 20) = 2."""
    skip_if_transformers_cannot_build_schedulefree()
    args = training_arguments(tmp_path, optim="schedule_free_adamw", warmup_steps=0.1, **CONSTANT)
    hf_args = training_arguments(tmp_path, arguments_cls=transformers.TrainingArguments, optim="schedule_free_adamw", warmup_steps=0.1, **CONSTANT)  # fmt: skip
    model = tiny_llama()
    hf_cls, hf_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(hf_args, model)
    assert hf_kwargs["warmup_steps"] == 0.1
    hf_opt = hf_cls([p for p in model.parameters()], **hf_kwargs)
    ctx = BuildContext(model=model, args=args, options={"weight_lr_power": 2.0, "r": 0.0, "foreach": None}, name="schedule_free_adamw")  # fmt: skip
    ours = get_optimizer("schedule_free_adamw").spec.factory(ctx)
    for opt in (hf_opt, ours):
        opt.train()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert hf_opt.param_groups[0]["scheduled_lr"] == pytest.approx(10 * 1e-3)  # transformers' bug
    assert ours.param_groups[0]["warmup_steps"] == 2
    assert ours.param_groups[0]["scheduled_lr"] == pytest.approx(0.5 * 1e-3)
    # epoch-based runs: the ratio is resolved once the trainer knows max_steps
    args = training_arguments(tmp_path, optim="schedule_free_sgd", warmup_steps=0.1, max_steps=-1, num_train_epochs=1, **CONSTANT)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sgd = get_optimizer("schedule_free_sgd").spec.factory(
            BuildContext(
                model=model,
                args=args,
                options={"weight_lr_power": 2.0, "r": 0.0, "foreach": None, "momentum": 0.9},
                name="schedule_free_sgd",
            )  # fmt: skip
        )
    ScheduleFreeCallback(sgd).on_train_begin(args, SimpleNamespace(max_steps=64), None)
    assert sgd.param_groups[0]["warmup_steps"] == 7


# -- saving and evaluating do not change training --------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_evaluating_and_saving_do_not_change_training(runs, name):
    plain = runs("plain", name, **CONSTANT)
    busy = runs("eval-save", name, **CONSTANT, **EVAL_AND_SAVE)
    # every 3 steps of 20: 6 (transformers 5.3); 5.25 also evaluates after the last step: 7
    assert len(busy.eval_losses) >= 20 // 3 and (busy.output_dir / "checkpoint-12").is_dir()
    assert_same_run(plain, busy)  # same losses and final weights, to the bit


def test_transformers_evaluations_change_training(runs):
    """In transformers each eval()/train() pair recomputes y by interpolation, with rounding: the run
    with evaluations ends on other weights than the run without."""
    name = "schedule_free_adamw"
    plain = runs("plain", name, reference=True, **CONSTANT)
    busy = runs("eval-save", name, reference=True, **CONSTANT, **EVAL_AND_SAVE)
    assert max_param_diff(final_x(plain.trainer), final_x(busy.trainer)) > 0


# -- the weights a user gets ---------------------------------------------------------------------------


def test_checkpoints_hold_eval_mode_weights(runs):
    name = "schedule_free_adamw"
    busy = runs("eval-save", name, **CONSTANT, **EVAL_AND_SAVE)
    for step in (4, 12, 20):  # 12 and 20 come right after an evaluation, 4 does not
        saved_weights, state = checkpoint(busy.output_dir, step)
        assert all(not g["train_mode"] for g in state["param_groups"]), "saved in eval mode"
        y, z, w = checkpoint_y_z(busy.trainer, state)
        for n, saved in saved_weights.items():
            x = y[n].clone().lerp_(z[n], w[n])
            assert torch.equal(saved, x), f"checkpoint-{step}: {n} is not the eval-mode weight"
            assert not torch.equal(saved, y[n]), f"checkpoint-{step}: {n} holds the train-mode weight"
    # transformers: what a checkpoint holds depends on whether an evaluation came just before
    ref = runs("eval-save", name, reference=True, **CONSTANT, **EVAL_AND_SAVE)
    _, state = checkpoint(ref.output_dir, 4)
    assert all(g["train_mode"] for g in state["param_groups"]), "transformers saved train-mode weights"
    _, state = checkpoint(ref.output_dir, 12)
    assert all(not g["train_mode"] for g in state["param_groups"])


def test_save_model_writes_eval_mode_weights_and_returns_to_train_mode(runs, tmp_path):
    name = "schedule_free_adamw"
    busy = runs("eval-save", name, **CONSTANT, **EVAL_AND_SAVE)
    trainer, opt = busy.trainer, raw(busy.trainer.optimizer)
    y = stashed_y(trainer)
    opt.train()  # as inside training
    assert max_param_diff(weights(trainer), y) == 0.0
    trainer.save_model(str(tmp_path / "ours"))
    saved = load_file(tmp_path / "ours" / "model.safetensors")
    assert max_param_diff(saved, x_from_y(trainer, y)) == 0.0
    assert max_param_diff(saved, busy.params) == 0.0  # the weights training ended on
    assert max_param_diff(saved, y) > 0
    assert opt.param_groups[0]["train_mode"], "back to train mode"
    assert max_param_diff(weights(trainer), y) == 0.0, "y untouched"
    opt.eval()  # leave the cached run as it was
    assert max_param_diff(weights(trainer), busy.params) == 0.0
    # transformers saves whatever mode the optimizer is in: after a run without evaluation, y
    ref = runs("plain", name, reference=True, **CONSTANT)
    ref.trainer.save_model(str(tmp_path / "transformers"))
    saved = load_file(tmp_path / "transformers" / "model.safetensors")
    assert max_param_diff(saved, ref.params) == 0.0
    assert max_param_diff(saved, x_from_y(ref.trainer, ref.params)) > 0


def test_load_best_model_at_end(tmp_path, caplog):
    args = dict(
        eval_dataset=SyntheticLMDataset(n=8, seed=1),
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # the worst loss: checkpoint-4, not the last one
        **CONSTANT,
    )
    result = run_training("schedule_free_adamw", tmp_path, steps=12, log_level="error", **args)
    trainer, opt = result.trainer, raw(result.trainer.optimizer)
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    best, _ = checkpoint(tmp_path, 4)
    assert max_param_diff(result.params, best) == 0.0
    assert not opt.param_groups[0]["train_mode"], "the best weights are eval-mode weights"
    assert trainer.evaluate()["eval_loss"] == trainer.state.best_metric  # evaluate() did not move them
    trainer.save_model(str(tmp_path / "final"))
    assert max_param_diff(load_file(tmp_path / "final" / "model.safetensors"), best) == 0.0
    # training on from here starts from the best weights, not from the stale y of step 12
    stale_y = stashed_y(trainer)
    with caplog.at_level(logging.WARNING, logger="optitrainer.schedulefree"):
        opt.train()
    assert "changed while the optimizer was in eval mode" in caplog.text
    now = weights(trainer)
    assert all(not torch.equal(now[n], stale_y[n]) for n in now)


# -- exact resume --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_exact(runs, tmp_path, name):
    """20 straight steps == 12 steps (checkpoint right after an evaluation) + resume + 8 steps."""
    straight = runs("plain", name, **CONSTANT)
    busy = runs("eval-save", name, **CONSTANT, **EVAL_AND_SAVE)
    _, state = checkpoint(busy.output_dir, 12)  # loads with weights_only=True
    assert all(g["k"] == 12 and not g["train_mode"] for g in state["param_groups"])
    assert all({"z", "y"} <= set(s) for s in state["state"].values()), "z and the exact y of every weight"
    resumed = run_training(
        name,
        tmp_path,
        steps=20,
        resume_from_checkpoint=str(busy.output_dir / "checkpoint-12"),
        log_level="error",
        eval_dataset=SyntheticLMDataset(n=8, seed=1),
        **CONSTANT,
        **EVAL_AND_SAVE,
    )
    # the log history of steps 1-12 comes from the checkpoint's trainer_state.json
    assert len(resumed.losses) == 20 and resumed.losses[12:] == straight.losses[12:]
    assert max_param_diff(resumed.params, straight.params) == 0.0
    assert max_param_diff(stashed_y(resumed.trainer), stashed_y(straight.trainer)) == 0.0


def test_resume_without_evaluation_before_the_checkpoint(runs, tmp_path):
    """checkpoint-8 (no evaluation just before), a linear schedule with warmup, plain arguments."""
    name = "schedule_free_sgd"
    kwargs = {"warmup_steps": 3, "save_strategy": "steps", "save_steps": 8}
    straight = runs("warmup", name, warmup_steps=3)
    first = runs("warmup-save", name, **kwargs)
    assert_same_run(straight, first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = run_training(
            name,
            tmp_path,
            steps=20,
            resume_from_checkpoint=str(first.output_dir / "checkpoint-8"),
            log_level="error",
            **kwargs,  # fmt: skip
        )
    assert len(resumed.losses) == 20 and resumed.losses[8:] == straight.losses[8:]
    assert resumed.learning_rates[8:] == straight.learning_rates[8:]
    assert max_param_diff(resumed.params, straight.params) == 0.0


# -- options, errors, packaging ------------------------------------------------------------------------


def test_options_reach_the_optimizer(tmp_path):
    ctx = build_context("schedule_free_sgd", tmp_path, **CONSTANT)
    ctx.options.update(momentum=0.8, weight_lr_power=1.0, r=0.5, foreach=False)
    opt = get_optimizer("schedule_free_sgd").spec.factory(ctx)
    group = opt.param_groups[0]
    assert (group["momentum"], group["weight_lr_power"], group["r"], group["foreach"]) == (
        0.8,
        1.0,
        0.5,
        False,
    )
    ctx = build_context("schedule_free_radam", tmp_path, **CONSTANT)
    ctx.options["silent_sgd_phase"] = False
    assert get_optimizer("schedule_free_radam").spec.factory(ctx).param_groups[0]["silent_sgd_phase"] is False


def test_sgd_momentum_must_lie_strictly_between_0_and_1(tmp_path):
    args = training_arguments(tmp_path, optim="schedule_free_sgd", optim_args="momentum=1.0", **CONSTANT)
    with pytest.raises(
        IncompatibleConfigError, match=r"momentum=1.0.*strictly between 0 and 1.*momentum=0.9"
    ):
        OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset())


def test_unknown_option_names_the_accepted_ones(tmp_path):
    with pytest.raises(Exception, match="weight_lr_power") as err:
        OptiTrainingArguments(
            output_dir=str(tmp_path), optim="schedule_free_adamw", optim_args="weight_lr_pwr=1"
        )
    assert "weight_lr_pwr" in str(err.value)


def test_names_alias_and_provenance():
    for name in NAMES:
        resolved = get_optimizer(name)
        assert resolved.spec.name == name and resolved.provenance.distribution == "optitrainer-schedulefree"
        assert resolved.spec.capabilities.train_eval_modes
    assert get_optimizer("schedule_free_radamw").spec.name == "schedule_free_radam"


def test_spec_module_imports_nothing_heavy():
    tree = ast.parse(Path(optitrainer_schedulefree.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    modules = {n.module if isinstance(n, ast.ImportFrom) else n.names[0].name for n in top}
    assert modules <= {"__future__", "warnings", "typing", "optitrainer.plugin"}, modules


def test_guide_example(capsys):
    runpy.run_path(str(REPO / "examples" / "guide" / "schedulefree.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "optim='schedule_free_radam' built ScheduleFreeRAdam" in out
    assert "optimizer mode after training: eval" in out
    assert "final loss:" in out
