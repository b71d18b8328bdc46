"""Exact clipping in the layerwise engine without a second full backward (optitrainer.clipping, issue 9)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optitrainer import OptiTrainer
from optitrainer.layerwise import LayerwiseOptimizer
from optitrainer.testing import assert_same_run, run_training, tiny_llama

KW = {"steps": 4, "max_grad_norm": 0.5, "learning_rate": 5e-3}


class TwoPassTrainer(OptiTrainer):
    """The engine without the model: the two-backward method for every parameter (the reference)."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        assert isinstance(optimizer, LayerwiseOptimizer)
        optimizer.model = None
        return optimizer


class TwoPassFusedTrainer(OptiTrainer):
    """A fused-backward optimizer (LOMO) without its rebuilder: two backward passes (the reference)."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        inner = optimizer
        while hasattr(inner, "optimizer") and not hasattr(inner, "_rebuilder"):
            inner = inner.optimizer
        assert inner._rebuilder is not None
        inner._rebuilder.close()
        inner._rebuilder = None
        return optimizer


def _count_weight_gradients(model: nn.Module, name: str) -> list[int]:
    """How many times autograd produced ``name``'s gradient (1 per step: no second backward for it)."""
    fired: list[int] = []
    dict(model.named_parameters())[name].register_post_accumulate_grad_hook(lambda p: fired.append(1))
    return fired


def test_rebuilt_gradients_are_bit_identical_to_two_backward_passes(tmp_path):
    model = tiny_llama()
    q_fired = _count_weight_gradients(model, "model.layers.0.self_attn.q_proj.weight")
    emb_fired = _count_weight_gradients(model, "model.embed_tokens.weight")
    fast = run_training("adamw_torch_layerwise", tmp_path / "fast", model=model, **KW)
    ref_model = tiny_llama()
    ref_fired = _count_weight_gradients(ref_model, "model.layers.0.self_attn.q_proj.weight")
    ref = run_training(
        "adamw_torch_layerwise", tmp_path / "ref", model=ref_model, trainer_cls=TwoPassTrainer, **KW
    )
    assert len(ref_fired) == 2 * KW["steps"]  # the reference really runs two backward passes
    assert len(q_fired) == len(emb_fired) == KW["steps"]  # rebuilt: autograd's gradient only in the norm pass
    assert fast.grad_norms == ref.grad_norms
    assert all(n > KW["max_grad_norm"] for n in fast.grad_norms)  # clipping really happened
    assert_same_run(fast, ref)  # atol 0: the same bits
    std = run_training("adamw_torch", tmp_path / "std", **KW)
    assert fast.grad_norms == pytest.approx(std.grad_norms, rel=1e-6)
    assert_same_run(fast, std, atol=1e-6)


def test_tied_embeddings_are_rebuilt_as_the_sum_of_both_contributions(tmp_path):
    tied = {"tie_word_embeddings": True}
    model = tiny_llama(**tied)
    emb_fired = _count_weight_gradients(model, "model.embed_tokens.weight")
    q_fired = _count_weight_gradients(model, "model.layers.0.self_attn.q_proj.weight")
    lw = run_training("adamw_torch_layerwise", tmp_path / "lw", model=model, **KW)
    assert len(emb_fired) == len(q_fired) == KW["steps"]  # no second backward down to the embedding
    ref = run_training(
        "adamw_torch_layerwise", tmp_path / "ref", model=tiny_llama(**tied), trainer_cls=TwoPassTrainer, **KW
    )
    assert lw.grad_norms == ref.grad_norms
    assert_same_run(lw, ref)  # atol 0: the same bits
    std = run_training("adamw_torch", tmp_path / "std", model=tiny_llama(**tied), **KW)
    assert lw.grad_norms == pytest.approx(std.grad_norms, rel=1e-6)
    assert_same_run(lw, std, atol=1e-6)


class OddLM(nn.Module):
    """A small LM with a Linear called ``calls`` times per forward and a bare 2-D parameter (not covered)."""

    def __init__(self, vocab: int = 64, hidden: int = 16, calls: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.calls = calls
        self.embed = nn.Embedding(vocab, hidden, padding_idx=0)
        self.shared = nn.Linear(hidden, hidden)
        self.mix = nn.Parameter(torch.randn(hidden, hidden) / hidden**0.5)  # used through matmul
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, labels=None, attention_mask=None, **_):
        h = self.embed(input_ids)
        for _ in range(self.calls):
            h = torch.tanh(self.shared(h))
        h = h @ self.mix
        logits = self.head(self.norm(h))
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize(
    ("calls", "shared_backwards"), [(2, 1), (3, 2)], ids=["twice-rebuilt", "thrice-fallback"]
)
def test_modules_called_several_times_and_other_parameters_stay_exact(calls, shared_backwards, tmp_path):
    from optitrainer.testing import SyntheticLMDataset

    data = SyntheticLMDataset(vocab_size=64)
    model = OddLM(calls=calls)
    shared_fired = _count_weight_gradients(model, "shared.weight")
    head_fired = _count_weight_gradients(model, "head.weight")
    mix_fired = _count_weight_gradients(model, "mix")
    lw = run_training("adamw_torch_layerwise", tmp_path / "lw", model=model, dataset=data, **KW)
    # two calls: the sum of two rebuilt contributions; three: a second backward (the sum's order matters)
    assert len(shared_fired) == shared_backwards * KW["steps"] and len(head_fired) == KW["steps"]
    assert len(mix_fired) == 2 * KW["steps"]  # a bare parameter: always the second backward
    ref = run_training(
        "adamw_torch_layerwise",
        tmp_path / "ref",
        model=OddLM(calls=calls),
        dataset=data,
        trainer_cls=TwoPassTrainer,
        **KW,
    )
    assert lw.grad_norms == ref.grad_norms
    assert_same_run(lw, ref)
    std = run_training("adamw_torch", tmp_path / "std", model=OddLM(calls=calls), dataset=data, **KW)
    assert all(n > KW["max_grad_norm"] for n in std.grad_norms)
    assert lw.grad_norms == pytest.approx(std.grad_norms, rel=1e-6)
    assert_same_run(lw, std, atol=1e-6)


def test_gradient_checkpointing_uses_two_backward_passes_and_stays_exact(tmp_path):
    kw = {**KW, "gradient_checkpointing": True}
    lw = run_training("adamw_torch_layerwise", tmp_path / "lw", **kw)
    std = run_training("adamw_torch", tmp_path / "std", **kw)
    assert lw.grad_norms == pytest.approx(std.grad_norms, rel=1e-6)
    assert_same_run(lw, std, atol=1e-6)


def test_clipcost_bench_steps_the_two_runs_in_turn():
    import argparse

    from optitrainer.bench.clipcost import measure

    ns = argparse.Namespace(
        model="tiny", max_grad_norm=0.5, steps=3, warmup_steps=1, batch_size=4, seq_len=16, lr=5e-3,
        threads=1, seed=0, target_modules="all-linear", method="rebuild",
    )  # fmt: skip
    r = measure(ns, "adamw_torch_layerwise")
    assert r["clipping_engaged"] and r["clipped_s"] > 0 and r["unclipped_s"] > 0


@pytest.mark.parametrize(
    ("optim", "tied"), [("adamw_torch_layerwise", False), ("lomo", False), ("adamw_torch_layerwise", True)]
)
def test_under_bf16_autocast_linear_gradients_are_rebuilt_bit_identically(optim, tied, tmp_path):
    # mixed precision: float32 weights, matmuls in bfloat16 (the usual GPU setup; CPU autocast here);
    # tied: the head's bfloat16 contribution, cast back, plus the embedding's float32 one
    kw = {**KW, "bf16": True}
    model = tiny_llama(tie_word_embeddings=tied)
    q_fired = _count_weight_gradients(model, "model.layers.0.self_attn.q_proj.weight")
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"  # tied: listed once, as the embedding
    head_fired = _count_weight_gradients(model, head)
    fast = run_training(optim, tmp_path / "fast", model=model, **kw)
    assert len(q_fired) == len(head_fired) == KW["steps"]  # rebuilt, not a second backward
    assert all(n > KW["max_grad_norm"] for n in fast.grad_norms)
    ref_model = tiny_llama(tie_word_embeddings=tied)
    ref_fired = _count_weight_gradients(ref_model, "model.layers.0.self_attn.q_proj.weight")
    trainer_cls = TwoPassTrainer if optim.endswith("_layerwise") else TwoPassFusedTrainer
    ref = run_training(optim, tmp_path / "ref", model=ref_model, trainer_cls=trainer_cls, **kw)
    assert len(ref_fired) == 2 * KW["steps"]
    assert fast.grad_norms == ref.grad_norms
    assert_same_run(fast, ref)  # atol 0: the same bits as autograd's bfloat16 gradients


def tiny_gpt2():
    """GPT-2's projections are transformers ``Conv1D`` (``addmm`` with an ``(in, out)`` weight); its head is tied."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from optitrainer.testing import TINY_VOCAB

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=TINY_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).float()


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_gpt2_conv1d_and_tied_head_are_rebuilt_bit_identically(bf16, tmp_path):
    kw = {**KW, "bf16": bf16}
    model = tiny_gpt2()
    fired = {
        name: _count_weight_gradients(model, name)
        for name in (
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.mlp.c_proj.weight",
            "transformer.wte.weight",
        )
    }
    lw = run_training("adamw_torch_layerwise", tmp_path / "lw", model=model, **kw)
    assert all(len(f) == KW["steps"] for f in fired.values()), {n: len(f) for n, f in fired.items()}
    ref = run_training(
        "adamw_torch_layerwise", tmp_path / "ref", model=tiny_gpt2(), trainer_cls=TwoPassTrainer, **kw
    )
    assert lw.grad_norms == ref.grad_norms
    assert all(n > KW["max_grad_norm"] for n in lw.grad_norms)
    assert_same_run(lw, ref)  # atol 0: the same bits
    std = run_training("adamw_torch", tmp_path / "std", model=tiny_gpt2(), **kw)
    assert lw.grad_norms == pytest.approx(std.grad_norms, rel=1e-6)
    assert_same_run(lw, std, atol=1e-6)


def test_holding_the_gradients_clips_to_the_same_bits_without_rebuilding(tmp_path):
    """``layerwise_clipping="hold"``: one backward keeps every gradient until the norm is known."""
    model = tiny_llama()
    q_fired = _count_weight_gradients(model, "model.layers.0.self_attn.q_proj.weight")
    held = run_training(
        "adamw_torch_layerwise", tmp_path / "hold", model=model, layerwise_clipping="hold", **KW
    )
    assert held.trainer._opti_optimizer.clipping == "hold" and held.trainer._opti_optimizer._rebuilder is None
    assert len(q_fired) == KW["steps"]  # one backward per step
    rebuilt = run_training("adamw_torch_layerwise", tmp_path / "rebuild", layerwise_clipping="rebuild", **KW)
    assert rebuilt.trainer._opti_optimizer.clipping == "rebuild"
    assert all(n > KW["max_grad_norm"] for n in held.grad_norms)  # clipping really happened
    assert held.grad_norms == rebuilt.grad_norms
    assert_same_run(held, rebuilt)  # atol 0: the same bits


def test_an_unknown_clipping_scheme_is_refused_with_the_choices(tmp_path):
    from optitrainer.testing import training_arguments

    with pytest.raises(ValueError, match="layerwise_clipping='fast': use one of auto, rebuild, hold"):
        training_arguments(tmp_path, optim="adamw_torch_layerwise", layerwise_clipping="fast")
