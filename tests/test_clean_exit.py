"""A gloo launch that finished training exits with 0, not with an abort at interpreter shutdown."""

from __future__ import annotations

from pathlib import Path

from launch import torchrun

from optitrainer import OptiTrainer, clean_exit
from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments

SCRIPT = Path(__file__).parent / "gloo_exit.py"


def test_the_exit_handler_turns_an_abort_at_exit_into_a_clean_exit():
    # the same ending without the handler aborts: proof that the launch below exercises it
    bare = torchrun(SCRIPT, "bare", timeout=120, check=False)
    assert bare.returncode != 0 and "terminate called without an active exception" in bare.output, (
        "torch no longer aborts when gloo's worker thread is left a collective at exit: "
        "optitrainer.clean_exit may be unnecessary with this torch\n" + bare.output[-3000:]
    )
    proc = torchrun(SCRIPT, "handler", timeout=120)  # asserts exit status 0
    assert proc.output.count("issues the collective") == 2


def test_optitrainer_train_registers_the_exit_handler(tmp_path, monkeypatch):
    monkeypatch.setattr(clean_exit, "_registered", False)
    args = training_arguments(str(tmp_path), optim="adamw_torch", max_steps=1)
    OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8)).train()
    assert clean_exit._registered
