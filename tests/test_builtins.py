"""Built-in optimizers: same numbers as transformers.Trainer, and Muon's documented split."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from transformers import Trainer, TrainingArguments

from optitrainer import OptiTrainer
from optitrainer.builtin import muon_split
from optitrainer.testing import (
    SyntheticLMDataset,
    assert_learns,
    assert_same_run,
    run_training,
    tiny_llama,
    training_arguments,
)

PARITY = [
    ("adamw_torch", None),
    ("adamw_torch_fused", None),
    ("sgd", None),
    ("sgd", "momentum=0.9, nesterov=True"),
    ("adagrad", None),
    ("rmsprop", "momentum=0.5, centered=True"),
    ("adafactor", None),
]


@pytest.mark.parametrize(("optim", "optim_args"), PARITY, ids=[f"{o}-{a}" for o, a in PARITY])
def test_same_losses_and_weights_as_transformers(optim, optim_args, tmp_path):
    common = {"steps": 24, "weight_decay": 0.1, "warmup_steps": 3, "optim_args": optim_args}
    ref = run_training(optim, tmp_path / "hf", trainer_cls=Trainer, arguments_cls=TrainingArguments, **common)
    ours = run_training(optim, tmp_path / "opti", **common)
    assert len(ours.losses) == 24
    assert_same_run(ours, ref)  # identical, not close
    assert ours.learning_rates == ref.learning_rates
    assert ours.grad_norms == ref.grad_norms


def test_weight_decay_skips_biases_and_norms(tmp_path):
    model = tiny_llama(attention_bias=True)
    trainer = OptiTrainer(
        model=model,
        args=training_arguments(tmp_path, optim="adamw_torch", weight_decay=0.1),
        train_dataset=SyntheticLMDataset(),
    )
    opt = trainer.create_optimizer()
    name_of = {id(p): n for n, p in model.named_parameters()}
    decayed = {name_of[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {name_of[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert any(n.endswith("q_proj.weight") for n in decayed)
    assert any(n.endswith("q_proj.bias") for n in plain)
    assert any("layernorm" in n for n in plain) and "model.norm.weight" in plain
    assert not any("bias" in n or "norm" in n for n in decayed)


def test_build_is_logged_once_with_provenance_and_kept_with_the_checkpoint(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="optitrainer"):
        run = run_training("sgd", tmp_path, steps=2, save_strategy="steps", save_steps=2)
    built = [r.getMessage() for r in caplog.records if "built" in r.getMessage()]
    assert len(built) == 1
    assert "optim='sgd' built SGD from optitrainer 0.1.0" in built[0]
    prov = json.loads((tmp_path / "checkpoint-2" / "optitrainer.json").read_text())
    assert prov == {"optimizer": "sgd", "distribution": "optitrainer", "version": "0.1.0"}
    assert run.losses


def test_muon_split_hidden_matrices_vs_rest():
    model = tiny_llama()
    muon, rest = muon_split(model.named_parameters(), r"(^|\.)(embed_tokens|lm_head)(\.|$)")
    muon_names = {n for n, _ in muon}
    rest_names = {n for n, _ in rest}
    assert "model.layers.0.self_attn.q_proj.weight" in muon_names
    assert "model.layers.1.mlp.down_proj.weight" in muon_names
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= rest_names
    assert all(p.ndim == 2 for _, p in muon)


NO_MUON = pytest.mark.skipif(
    not hasattr(torch.optim, "Muon"),
    reason="torch < 2.9 has no torch.optim.Muon: muon is refused (tested below)",
)


def test_muon_is_refused_exactly_when_torch_lacks_it(tmp_path):
    from optitrainer import IncompatibleConfigError, OptiTrainingArguments

    if hasattr(torch.optim, "Muon"):
        OptiTrainingArguments(str(tmp_path), optim="muon", report_to="none")
        return
    with pytest.raises(IncompatibleConfigError) as info:  # when the arguments are built
        OptiTrainingArguments(str(tmp_path), optim="muon", report_to="none")
    msg = str(info.value)
    assert f"muon needs torch.optim.Muon, which torch {torch.__version__} lacks (added in torch 2.9)" in msg
    assert "pip install 'torch>=2.9'" in msg


def test_needs_torch_names_the_feature_the_release_and_the_fix():
    from optitrainer.plugin import needs_torch

    assert needs_torch("2.6", "torch.distributed.fsdp.fully_shard", "x") == []  # the declared floor
    (msg,) = needs_torch("99.1", "torch.optim.Future", "future_opt")
    assert msg.startswith(f"future_opt needs torch.optim.Future, which torch {torch.__version__} lacks")
    assert "(added in torch 99.1); pip install 'torch>=99.1'" in msg


@NO_MUON
def test_muon_trains_and_its_exclude_is_configurable(tmp_path):
    run = run_training("muon", tmp_path / "a", steps=30, learning_rate=3e-3)
    assert_learns(run)
    opt = run.trainer.optimizer.optimizer
    muon_groups = [g for g in opt.param_groups if g["use_muon"]]
    assert muon_groups and all(p.ndim == 2 for g in muon_groups for p in g["params"])
    adam_params = {id(p) for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert id(run.trainer.model.model.embed_tokens.weight) in adam_params
    # exclude="mlp": MLP matrices go to AdamW too
    run2 = run_training("muon", tmp_path / "b", steps=1, optim_args={"exclude": "embed_tokens|lm_head|mlp"})
    opt2 = run2.trainer.optimizer.optimizer
    mlp = run2.trainer.model.model.layers[0].mlp.up_proj.weight
    assert any(p is mlp for g in opt2.param_groups if not g["use_muon"] for p in g["params"])


@NO_MUON
def test_muon_resumes_exactly(tmp_path):
    straight = run_training("muon", tmp_path / "straight", steps=8)
    run_training("muon", tmp_path / "half", steps=8, save_strategy="steps", save_steps=4)
    sd = torch.load(tmp_path / "half" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert sd["state"]
    resumed = run_training(
        "muon", tmp_path / "half", steps=8, resume_from_checkpoint=str(tmp_path / "half" / "checkpoint-4")
    )
    # the resumed trainer carries the first half's log history; the second half is what it trained
    assert len(resumed.losses) == 8
    assert_same_run(resumed, straight)


def test_transformers_fallback_when_no_plugin_provides_a_name(tmp_path):
    """With plugin autoloading off, galore_adamw is built by transformers' own handler, identically."""
    code = f"""
import os
os.environ["OPTITRAINER_DISABLE_PLUGIN_AUTOLOAD"] = "1"
from transformers import Trainer, TrainingArguments
from optitrainer import get_optimizer
from optitrainer.testing import run_training
assert get_optimizer("galore_adamw").provenance.distribution == "transformers"
kw = dict(steps=5, optim_target_modules=["q_proj", "v_proj"], optim_args="rank=4")
a = run_training("galore_adamw", {str(tmp_path / "a")!r}, **kw)
b = run_training("galore_adamw", {str(tmp_path / "b")!r}, trainer_cls=Trainer, arguments_cls=TrainingArguments, **kw)
assert a.losses == b.losses, (a.losses, b.losses)
print(type(a.trainer.optimizer.optimizer).__module__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("galore_torch")
