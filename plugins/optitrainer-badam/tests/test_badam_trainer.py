"""``optim="badam"`` through ``OptiTrainer``: upstream parity, one block per step, exact resume."""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import optitrainer
from optitrainer import OptiTrainer
from optitrainer.testing import (
    ConformanceCase,
    SyntheticLMDataset,
    assert_same_run,
    check_refusals,
    run_training,
    tiny_llama,
    training_arguments,
)

STEPS = 5
# 2 blocks (the tiny Llama's decoder layers); upstream's schedule: block 0 for step 1, then 2 steps each
BASE = {"optim_args": "switch_block_every=2", "weight_decay": 0.0, "steps": STEPS}
SCHEDULE = [0, 1, 1, 0, 0]


class Snapshots(TrainerCallback):
    """The weights after every optimizer step."""

    def __init__(self):
        self.params: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})


def _opti(tmp_path, *, steps, optim_args, snapshots=None, **overrides):
    args = training_arguments(tmp_path, optim="badam", max_steps=steps, optim_args=optim_args, **overrides)
    trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset())
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    if snapshots is not None:
        trainer.add_callback(snapshots)
    trainer.train()
    return trainer, initial


def _result(trainer):
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return (
        [h["loss"] for h in logs],
        {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        [h.get("badam_block") for h in logs],
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """ours with the base settings, with a weight snapshot after every step"""
    snapshots = Snapshots()
    trainer, initial = _opti(tmp_path_factory.mktemp("ref"), snapshots=snapshots, **BASE)
    return trainer, initial, snapshots.params


def test_same_numbers_as_upstream_blockoptimizer_in_transformers_trainer(reference, tmp_path):
    """LLaMA-Factory's integration: transformers.Trainer with badam.BlockOptimizer passed in."""
    from badam import BlockOptimizer as Upstream

    model = tiny_llama()
    args = training_arguments(
        tmp_path, arguments_cls=TrainingArguments, optim="adamw_torch", max_steps=STEPS, weight_decay=0.0
    )
    # upstream applies the base's *default* weight decay to every active parameter: 0.0 here, as ours
    base = torch.optim.AdamW(
        [p for p in model.parameters()],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=0.0,
    )
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = Upstream(
            base, list(model.named_parameters()), switch_block_every=2, switch_mode="ascending", verbose=0
        )
        trainer = Trainer(model=model, args=args, train_dataset=SyntheticLMDataset(), optimizers=(opt, None))
        trainer.train()
    up_losses, up_params, _ = _result(trainer)
    losses, params, blocks = _result(reference[0])
    assert losses == up_losses
    assert all(torch.equal(params[n], up_params[n]) for n in params)
    assert blocks == SCHEDULE


def test_only_the_active_block_changes_and_training_unfreezes_at_the_end(reference):
    trainer, initial, snapshots = reference
    names = list(initial)
    block_of = {n: (0 if ".layers.0." in n else 1 if ".layers.1." in n else None) for n in names}
    before = initial
    for step, (after, block) in enumerate(zip(snapshots, SCHEDULE), start=1):
        changed = {n for n in names if not torch.equal(before[n], after[n])}
        assert changed == {n for n in names if block_of[n] == block}, step
        before = after
    # embedding, final norm and head are in no automatic block (include_embedding/include_lm_head)
    assert all(torch.equal(initial[n], before[n]) for n in names if block_of[n] is None)
    assert all(p.requires_grad for p in trainer.model.parameters())  # the callback gave the flags back


def test_gradient_accumulation_keeps_the_block_for_the_whole_step(reference, tmp_path):
    """2 micro-batches of 2 == one batch of 4: the block switches between optimizer steps only."""
    trainer, _ = _opti(tmp_path, **BASE, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    losses, params, blocks = _result(trainer)
    ref_losses, ref_params, ref_blocks = _result(reference[0])
    assert blocks == ref_blocks == SCHEDULE
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert max(float((params[n] - ref_params[n]).abs().max()) for n in params) < 1e-5


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_numbers(reference, tmp_path, reentrant):
    """Frozen embeddings: the checkpointed layers' inputs still get gradients (transformers makes the
    embedding output require them), so the active layer trains exactly as without checkpointing."""
    trainer, _ = _opti(
        tmp_path,
        **BASE,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    losses, params, blocks = _result(trainer)
    ref_losses, ref_params, _ = _result(reference[0])
    assert losses == ref_losses and blocks == SCHEDULE
    assert all(torch.equal(params[n], ref_params[n]) for n in params)


@pytest.mark.parametrize(
    "optim_args, save_at, steps, schedule",
    [
        # switch after step 2: the checkpoint lands right across the switch
        ("switch_block_every=3", 2, 5, [0, 0, 1, 1, 1]),
        # 3 blocks (the third: head, embedding, final norm), a new block each step: new random orders
        # drawn after resuming
        ("switch_mode=random, switch_block_every=1, include_lm_head=True, seed=3", 2, 6, None),
        # bf16 weights, mid-block: the fp32 master copies come from the checkpoint
        ("switch_block_every=4, dtype=bf16", 2, 5, [0, 0, 0, 1, 1]),
    ],
    ids=["ascending-across-switch", "random", "bf16-mid-block"],
)
def test_resume_equals_uninterrupted(tmp_path, optim_args, save_at, steps, schedule):
    dtype = torch.bfloat16 if optim_args.endswith(", dtype=bf16") else torch.float32
    optim_args = optim_args.removesuffix(", dtype=bf16")
    kw = {"optim_args": optim_args, "weight_decay": 0.1, "warmup_steps": 1, "learning_rate": 1e-2}
    full = run_training(
        "badam",
        tmp_path,
        steps=steps,
        save_strategy="steps",
        save_steps=save_at,
        model=tiny_llama().to(dtype),
        **kw,
    )
    kw["model"] = tiny_llama().to(dtype)
    ckpt = tmp_path / f"checkpoint-{save_at}"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["badam"]["global_step"] == save_at
    resumed = run_training("badam", tmp_path, steps=steps, resume_from_checkpoint=str(ckpt), **kw)
    assert_same_run(resumed, full)  # losses and final weights, bit for bit
    assert resumed.learning_rates == full.learning_rates
    blocks = [h["badam_block"] for h in resumed.trainer.state.log_history if "loss" in h]
    assert blocks == [h["badam_block"] for h in full.trainer.state.log_history if "loss" in h]
    # the schedule itself: same next block, same remaining order, same generator state
    ends = [r.trainer.optimizer.optimizer.state_dict()["badam"] for r in (resumed, full)]
    assert torch.equal(ends[0].pop("generator"), ends[1].pop("generator"))
    masters = [e.pop("masters") for e in ends]
    assert masters[0].keys() == masters[1].keys() and bool(masters[0]) == (dtype == torch.bfloat16)
    assert all(torch.equal(masters[0][k], masters[1][k]) for k in masters[0])
    assert ends[0] == ends[1]
    if schedule is not None:
        assert blocks == schedule
    else:
        assert len(set(blocks)) == 3  # every block trained


def test_parameters_frozen_by_the_user_stay_frozen(tmp_path):
    model = tiny_llama()
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    args = training_arguments(tmp_path, optim="badam")
    trainer = OptiTrainer(model=model, args=args, train_dataset=SyntheticLMDataset(n=8))
    optimizer = trainer.create_optimizer()
    assert optimizer.active_block == 0
    active = {n for n, p in model.named_parameters() if p.requires_grad}
    assert active and all(".layers.0." in n for n in active)
    assert not frozen.requires_grad  # in the active block, but not trainable when the optimizer was built
    optimizer.restore_requires_grad()
    assert not frozen.requires_grad and sum(not p.requires_grad for p in model.parameters()) == 1


def test_memory_script_state_is_one_block(tmp_path):
    import runpy
    from pathlib import Path

    measure = runpy.run_path(str(Path(__file__).parents[1] / "memory.py"))["measure"]
    r = measure(layers=3, hidden=32, vocab=97)
    steps = 4 * 9  # one float32 step counter per parameter of a Llama layer (7 linears, 2 norms)
    assert r["badam_state_bytes"] == 2 * 4 * r["badam_block_params"] + steps
    assert r["adamw_torch_state_bytes"] == 2 * 4 * r["model_params"] + 4 * (3 * 9 + 3)
    assert r["badam_master_bytes"] == 0


def test_bad_options_are_refused_with_the_fix(tmp_path):
    from optitrainer import InvalidOptimArgsError, OptiTrainingArguments  # noqa: F401

    with pytest.raises(Exception, match="start_block=0"):
        training_arguments(tmp_path, optim="badam", optim_args="switch_mode=fixed")
    with pytest.raises(Exception, match="switch_mode"):
        training_arguments(tmp_path, optim="badam", optim_args="switch_mode=sideways")
    with pytest.raises(Exception, match="include_lm_head only shape the automatic blocks"):
        training_arguments(
            tmp_path, optim="badam", optim_args="block_prefixes=layers.0., include_lm_head=True"
        )
    args = training_arguments(tmp_path, optim="badam", optim_args="block_prefixes='layers.0.;decoder.9.|x'")
    with pytest.raises(Exception, match=r"block 1 \['decoder.9.', 'x'\] matches no trainable parameter"):
        OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8))
    args = training_arguments(tmp_path, optim="badam", optim_args="start_block=2")
    with pytest.raises(Exception, match="start_block=2 is out of range: there are 2 blocks"):
        OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8))


def test_capabilities_claim_ddp_and_refuse_sharding_engines():
    # DDP: the trainer averages the gradients of whichever block is active (tests/test_distributed.py
    # trains it on 2 ranks across block switches and a resume); ZeRO and FSDP are refused
    check_refusals(ConformanceCase("badam"))
    spec = optitrainer.get_optimizer("badam").spec
    assert spec.capabilities.engines == frozenset({"ddp"}) and spec.capabilities.changes_trainable
    assert "FSDP" in spec.capabilities.distributed_note
    assert {o.name for o in spec.options} >= {
        "switch_block_every",
        "switch_mode",
        "start_block",
        "block_prefixes",
        "include_embedding",
        "include_lm_head",
    }


@pytest.mark.skipif(
    os.environ.get("OPTITRAINER_BADAM_DDP") != "1",
    reason="2-process torchrun (~1 min): OPTITRAINER_BADAM_DDP=1",
)
@pytest.mark.parametrize("find_unused", [0, 1])
def test_why_the_trainer_averages_badams_gradients_itself(tmp_path, find_unused):
    """Under DDP's reducer the block that becomes active after the first switch is never averaged."""
    import re
    from pathlib import Path

    from launch import torchrun

    proc = torchrun(Path(__file__).parent / "ddp_probe.py", tmp_path, find_unused, timeout=300)
    # the ranks share the launcher's output: lines may run into each other, so match numbers only
    number = r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"
    lines = re.findall(rf"rank difference layers\.0={number} layers\.1={number}", proc.output)
    assert len(lines) == 2, proc.output[-3000:]
    for first_block, second_block in lines:
        assert float(first_block) == 0.0  # registered in DDP's reducer when the model was wrapped
        assert float(second_block) > 1e-4  # activated later: its gradients were never averaged
