"""Specification of optim="lomo" / optim="adalomo" (optitrainer-lomo).

Each test names the behaviour it pins; those marked "transformers:" show what transformers.Trainer
does instead and fail on that behaviour.
"""

from __future__ import annotations

import copy
import os
import runpy
from pathlib import Path

import pytest
import torch
import transformers
from lomo_optim import AdaLomo as UpstreamAdaLomo
from lomo_optim import Lomo as UpstreamLomo
from optitrainer_lomo.optim import AdaLomo, FusedBackwardOptimizer, Lomo

import optitrainer
from optitrainer import IncompatibleConfigError, OptiTrainer, OptiTrainingArguments
from optitrainer.compat import argument_conflicts
from optitrainer.engine import Engine
from optitrainer.testing import (
    SyntheticLMDataset,
    assert_learns,
    assert_same_run,
    max_param_diff,
    run_training,
    tiny_llama,
)

REPO = Path(__file__).resolve().parents[3]
HF = {"trainer_cls": transformers.Trainer, "arguments_cls": transformers.TrainingArguments}
OURS = {"lomo": Lomo, "adalomo": AdaLomo}
UPSTREAM = {"lomo": UpstreamLomo, "adalomo": UpstreamAdaLomo}
LR = {"lomo": 0.3, "adalomo": 0.1}  # rates at which the tiny model visibly learns in 20 steps


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model runs faster on one thread (and does not spin when the machine is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cuda_is_identity(monkeypatch):
    """Let upstream AdaLomo run on CPU: its `.cuda()` allocations become no-ops (test-only patch)."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    ids = SyntheticLMDataset(n=4 * n).input_ids
    return [{"input_ids": ids[4 * i : 4 * i + 4], "labels": ids[4 * i : 4 * i + 4]} for i in range(n)]


def test_registered_from_this_distribution():
    for name in ("lomo", "adalomo"):
        resolved = optitrainer.get_optimizer(name)
        assert resolved.provenance.distribution == "optitrainer-lomo"
        caps = resolved.spec.capabilities
        assert caps.owns_backward and not caps.gradient_accumulation and not caps.fp16
        assert caps.distributed == frozenset({"ddp"}) and caps.engines == {"ddp"}  # DDP only
        assert "DeepSpeed owns the backward pass" in caps.distributed_note


# -- 1. parity with transformers.Trainer ------------------------------------------------------------
def test_lomo_parity_with_transformers(tmp_path):
    # transformers passes no weight_decay and never clips LOMO: compare where both agree
    kw = {"learning_rate": LR["lomo"], "lr_scheduler_type": "linear", "max_grad_norm": 0.0}
    ref = run_training("lomo", tmp_path / "ref", steps=20, **HF, **kw)
    ours = run_training("lomo", tmp_path / "opti", steps=20, **kw)
    assert_same_run(ref, ours)
    assert_learns(ours, min_drop=0.03)
    # max_grad_norm=0: no norm is measured, so none is logged (transformers logs a made-up 0.0)
    assert ours.grad_norms == [None] * 20
    assert ref.grad_norms == [0.0] * 20


def test_adalomo_parity_with_transformers_when_cuda_calls_are_patched(tmp_path, cuda_is_identity):
    kw = {"learning_rate": LR["adalomo"], "lr_scheduler_type": "linear", "max_grad_norm": 0.0}
    ref = run_training("adalomo", tmp_path / "ref", steps=20, **HF, **kw)
    ours = run_training("adalomo", tmp_path / "opti", steps=20, **kw)
    assert_same_run(ref, ours)
    assert_learns(ours, min_drop=0.05)


# -- 2. adalomo on CPU ------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the crash on a machine without CUDA")
def test_transformers_adalomo_crashes_without_cuda_optitrainer_trains(tmp_path):
    # transformers: upstream AdaLomo allocates its statistics with .cuda() -> crash before step 1
    # a CPU build of torch asserts it was "not compiled with CUDA"; a CUDA build on a machine without
    # a GPU finds "no NVIDIA driver"
    with pytest.raises((AssertionError, RuntimeError), match="not compiled with CUDA|no NVIDIA driver"):
        run_training("adalomo", tmp_path / "ref", steps=2, **HF)
    ours = run_training("adalomo", tmp_path / "opti", steps=2, max_grad_norm=0.0)
    assert len(ours.losses) == 2
    opt = ours.trainer.optimizer.optimizer
    state = opt.state[next(iter(ours.trainer.model.parameters()))]
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())


# -- 9 (and 2). the update numbers are upstream's, with linear hooks --------------------------------
@pytest.mark.parametrize("name", ["lomo", "adalomo"])
@pytest.mark.parametrize("clip,weight_decay,clip_value", [(None, 0.0, None), (1.0, 0.1, 0.01)])
def test_update_is_bit_identical_to_upstream(name, clip, weight_decay, clip_value, cuda_is_identity):
    model_up, model_ours = tiny_llama(), tiny_llama()
    up = UPSTREAM[name](
        model_up, lr=0.0, clip_grad_norm=clip, clip_grad_value=clip_value, weight_decay=weight_decay
    )
    # upstream decays every parameter: one group with its weight_decay
    ours = OURS[name](
        [{"params": list(model_ours.parameters()), "weight_decay": weight_decay}], clip_grad_value=clip_value
    )
    for step, (batch, lr) in enumerate(zip(batches(3), [0.1, 0.05, 0.02])):
        loss_up = model_up(**batch).loss
        if clip:
            up.grad_norm(loss_up)
        up.fused_backward(loss_up, lr)
        norm = ours.fused_backward(model_ours(**batch).loss, lr, max_grad_norm=clip or 0.0)
        if clip:
            assert norm == float(torch.norm(up.grad_norms, 2.0)), step
        else:
            assert norm is None
        for (n, a), b in zip(model_up.named_parameters(), model_ours.parameters()):
            assert torch.equal(a, b), f"step {step}: {n} differs by {(a - b).abs().max():g}"
            if name == "adalomo":
                stats = ours.state[b]
                if b.dim() > 1:
                    assert torch.equal(up.exp_avg_sq_row[n], stats["exp_avg_sq_row"])
                    assert torch.equal(up.exp_avg_sq_col[n], stats["exp_avg_sq_col"])
                else:
                    assert torch.equal(up.exp_avg_sq[n], stats["exp_avg_sq"])


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_each_hook_handles_only_its_own_parameter(name, cuda_is_identity):
    """Upstream walks model.named_parameters() in every hook (O(n²)); ours touches each tensor once."""
    batch = batches(1)[0]
    model_up, model_ours = tiny_llama(), tiny_llama()
    n_params = len(list(model_up.parameters()))
    up = UPSTREAM[name](model_up, lr=0.01)
    ours = OURS[name](list(model_ours.parameters()), lr=0.01)

    def counting(model):
        calls = []
        original = model.named_parameters

        def named_parameters(*a, **k):
            calls.append(1)
            return original(*a, **k)

        model.named_parameters = named_parameters
        return calls

    walks_up, walks_ours = counting(model_up), counting(model_ours)
    updates = []
    update = ours._update
    ours._update = lambda p, g, group: (updates.append(p), update(p, g, group))
    up.fused_backward(model_up(**batch).loss, 0.01)
    ours.fused_backward(model_ours(**batch).loss, 0.01)
    assert len(walks_up) == n_params + 1  # upstream: a full walk per hook, plus the trailing call
    assert len(walks_ours) == 0
    assert len(updates) == n_params and len({id(p) for p in updates}) == n_params  # each exactly once


def test_hooks_are_idle_outside_fused_backward():
    model = tiny_llama()
    opt = Lomo(list(model.parameters()), lr=1.0)
    before = copy.deepcopy(model.state_dict())
    model(**batches(1)[0]).loss.backward()  # an ordinary backward: gradients accumulate, no update
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    opt.fused_backward(model(**batches(1)[0]).loss, 1.0)
    assert all(p.grad is None for p in model.parameters())  # fused: gradients freed as used
    assert not all(torch.equal(before[n], p) for n, p in model.named_parameters())


# -- 3. weight decay from the arguments -------------------------------------------------------------
@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_weight_decay_reaches_the_update_except_norms(name, tmp_path):
    lr, wd = 0.05, 0.5
    kw = {"learning_rate": lr, "max_grad_norm": 0.0}
    p0 = dict(tiny_llama().named_parameters())
    plain = run_training(name, tmp_path / "plain", steps=1, **kw).params
    decayed = run_training(name, tmp_path / "decayed", steps=1, weight_decay=wd, **kw).params
    for n, p in decayed.items():
        if "norm" in n:  # the trainer's no-decay group
            assert torch.equal(p, plain[n]), n
        elif name == "lomo":  # p1 = p0 * (1 - lr*wd) - lr*g  and  plain = p0 - lr*g
            assert torch.allclose(p, plain[n] - lr * wd * p0[n].detach(), rtol=0, atol=1e-7), n
            assert not torch.equal(p, plain[n]), n
        else:
            assert not torch.equal(p, plain[n]), n


def test_transformers_drops_weight_decay_for_lomo(tmp_path):
    kw = {"learning_rate": 0.05, "max_grad_norm": 0.0, **HF}
    plain = run_training("lomo", tmp_path / "plain", steps=1, **kw)
    decayed = run_training("lomo", tmp_path / "decayed", steps=1, weight_decay=0.5, **kw)
    assert max_param_diff(plain.params, decayed.params) == 0.0  # transformers: weight_decay ignored


# -- 4. the scheduled learning rate reaches the update ----------------------------------------------
@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_scheduled_lr_reaches_the_update(name, tmp_path, monkeypatch):
    seen: list[tuple[int, float]] = []
    cls = OURS[name]
    update = cls._update

    def recording(self, p, grad, group):
        seen.append((self.step_num, self.lr))
        return update(self, p, grad, group)

    monkeypatch.setattr(cls, "_update", recording)
    result = run_training(
        name,
        tmp_path,
        steps=8,
        learning_rate=0.01,
        lr_scheduler_type="linear",
        warmup_steps=2,
        max_grad_norm=0.0,
    )
    per_step = {}
    for step, lr in seen:
        per_step.setdefault(step, set()).add(lr)
    assert sorted(per_step) == list(range(1, 9))
    assert all(len(lrs) == 1 for lrs in per_step.values())  # one rate per step, for every tensor
    used = [per_step[s].pop() for s in range(1, 9)]
    assert used == result.learning_rates
    assert used[0] < used[1] < used[2] and all(a > b for a, b in zip(used[2:], used[3:]))  # warm-up, decay


# -- 5. clipping: real global norm, two passes ------------------------------------------------------
@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_max_grad_norm_clips_with_the_real_pre_clip_norm(name, tmp_path):
    lr = 0.1
    first = {}

    def capture(module, args, kwargs):
        if not first:
            first.update({k: kwargs[k].clone() for k in ("input_ids", "attention_mask", "labels")})
            # the token count the loss is normalized by, as this transformers counts it (5.3 counts the
            # unshifted labels: a loss 15/16 of the model's own mean on 16-token rows)
            if "num_items_in_batch" in kwargs:
                first["num_items_in_batch"] = kwargs["num_items_in_batch"]

    model = tiny_llama()
    model.register_forward_pre_hook(capture, with_kwargs=True)
    clipped = run_training(name, tmp_path / "clip", steps=3, model=model, learning_rate=lr, max_grad_norm=1.0)

    reference = tiny_llama()  # the same initial weights, a plain backward on the same batch
    reference(**first).loss.backward()
    grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf")))
    assert norm > 1.0  # so clipping is active
    assert clipped.grad_norms[0] == pytest.approx(norm, rel=1e-5)
    assert all(g is not None and g > 0 for g in clipped.grad_norms)

    if name == "lomo":  # step 1 is exactly SGD with the clipped gradient
        one = run_training(name, tmp_path / "one", steps=1, learning_rate=lr, max_grad_norm=1.0)
        coef = 1.0 / (norm + 1e-6)
        for n, p in one.params.items():
            expected = dict(reference.named_parameters())[n].detach() - lr * coef * grads[n]
            assert torch.allclose(p, expected, rtol=0, atol=1e-6), n


def test_norm_pass_is_a_second_backward_only_when_clipping():
    model = tiny_llama()
    opt = Lomo(list(model.parameters()), lr=0.01)
    passes = []
    model.lm_head.weight.register_hook(lambda g: passes.append(1))
    assert opt.fused_backward(model(**batches(1)[0]).loss, 0.01, max_grad_norm=0.0) is None
    assert len(passes) == 1
    norm = opt.fused_backward(model(**batches(1)[0]).loss, 0.01, max_grad_norm=1.0)
    assert isinstance(norm, float) and norm > 0 and len(passes) == 3


def test_transformers_never_clips_lomo_and_logs_zero_norm(tmp_path):
    kw = {"learning_rate": LR["lomo"], **HF}
    clip = run_training("lomo", tmp_path / "clip", steps=3, max_grad_norm=1.0, **kw)
    free = run_training("lomo", tmp_path / "free", steps=3, max_grad_norm=0.0, **kw)
    assert clip.grad_norms == [0.0, 0.0, 0.0]  # transformers: a made-up norm
    assert max_param_diff(clip.params, free.params) == 0.0  # transformers: max_grad_norm ignored
    ours = run_training("lomo", tmp_path / "ours", steps=3, max_grad_norm=1.0, learning_rate=LR["lomo"])
    assert all(g > 1.0 for g in ours.grad_norms)
    assert max_param_diff(ours.params, free.params) > 0.0


# -- 6, 7. refused settings --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_refused_before_training(name, tmp_path):
    base = {"output_dir": str(tmp_path), "optim": name, "use_cpu": True, "report_to": "none"}
    with pytest.raises(IncompatibleConfigError, match="set gradient_accumulation_steps=1"):
        OptiTrainingArguments(**base, gradient_accumulation_steps=2)
    with pytest.raises(IncompatibleConfigError, match="fp16=True.*use bf16=True or fp32"):
        OptiTrainingArguments(**base, fp16=True)

    class TwoProcesses(OptiTrainingArguments):
        world_size = property(lambda self: 2)

    TwoProcesses(**base)  # DDP is accepted (tests/test_lomo_ddp.py trains under it)
    args = OptiTrainingArguments(**base)
    resolved = optitrainer.get_optimizer(name)
    assert argument_conflicts(resolved, args, Engine("ddp", 2, source="test")) == []
    for engine in (
        Engine("deepspeed", 2, zero_stage=3, source="test"),
        Engine("deepspeed", 2, zero_stage=1, source="test"),
        Engine("fsdp", 2, fsdp_version=2, source="test"),
    ):
        (refusal,) = argument_conflicts(resolved, args, engine)
        assert refusal.startswith(f"{engine} training (from test): {name} supports DDP"), refusal
        assert "DeepSpeed owns the backward pass" in refusal and "launch with DDP" in refusal
    zero3 = argument_conflicts(resolved, args, Engine("deepspeed", 2, zero_stage=3, source="test"))[0]
    assert "upstream's ZeRO-3 path" in zero3 and "outside transformers' Trainer" in zero3

    with pytest.raises(IncompatibleConfigError, match="load the model in bfloat16 or float32"):
        OptiTrainer(model=tiny_llama().half(), args=args, train_dataset=SyntheticLMDataset(n=8))


def test_transformers_updates_lomo_after_every_micro_batch(tmp_path):
    snapshots = []
    model = tiny_llama()
    weight = model.model.layers[0].mlp.down_proj.weight
    model.register_forward_pre_hook(lambda m, a: snapshots.append(weight.detach().clone()))
    run_training(
        "lomo", tmp_path, steps=1, model=model, gradient_accumulation_steps=2, max_grad_norm=0.0, **HF
    )
    assert len(snapshots) == 2  # two micro-batches, one optimizer step...
    assert not torch.equal(snapshots[0], snapshots[1])  # ...but transformers updated in between


# -- 8. checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_resume_equals_uninterrupted(name, tmp_path):
    kw = {"learning_rate": LR[name], "lr_scheduler_type": "linear", "max_grad_norm": 1.0}
    straight = run_training(name, tmp_path / "a", steps=10, save_strategy="steps", save_steps=5, **kw)
    ckpt = tmp_path / "a" / "checkpoint-5"
    resumed = run_training(name, tmp_path / "b", steps=10, resume_from_checkpoint=str(ckpt), **kw)
    assert_same_run(straight, resumed)

    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["fused_backward"]["step"] == 5
    if name == "adalomo":
        stats = [s for s in saved["state"].values()]
        assert len(stats) == len(list(straight.trainer.model.parameters()))
        for s in stats:
            assert s and all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in s.values())


def test_upstream_adalomo_state_dict_lacks_its_statistics(cuda_is_identity):
    model = tiny_llama()
    up = UpstreamAdaLomo(model, lr=0.01)
    up.fused_backward(model(**batches(1)[0]).loss, 0.01)
    assert any(t.abs().sum() > 0 for t in up.exp_avg_sq_row.values())
    assert up.state_dict()["state"] == {}  # upstream: a checkpoint restarts the second moments


def test_adalomo_statistics_stay_float32_through_state_dict():
    model = tiny_llama().to(torch.bfloat16)
    opt = AdaLomo(list(model.parameters()), lr=0.01)
    opt.fused_backward(model(**batches(1)[0]).loss, 0.01)
    saved = copy.deepcopy(opt.state_dict())
    fresh = AdaLomo(list(model.parameters()), lr=0.01)
    fresh.load_state_dict(saved)  # torch would cast them to the parameters' bfloat16
    assert fresh.step_num == 1
    for p in model.parameters():
        for key, value in fresh.state[p].items():
            assert value.dtype == torch.float32 and torch.equal(value, opt.state[p][key])


def test_step_is_a_no_op_and_rejects_closures():
    model = tiny_llama()
    opt = Lomo(list(model.parameters()), lr=0.01)
    assert isinstance(opt, FusedBackwardOptimizer)
    opt.step()
    with pytest.raises(RuntimeError, match="fused_backward"):
        opt.step(lambda: 0.0)


# -- 10. the guide's example -------------------------------------------------------------------------
def test_guide_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    runpy.run_path(str(REPO / "examples" / "guide" / "lomo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "final loss:" in out
    assert "grad_norm=None" not in out  # the guide keeps max_grad_norm=1.0: a real norm is logged
