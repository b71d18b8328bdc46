"""Exact clipping without a second full backward: rebuilt gradients give the two-pass method's bits."""

from __future__ import annotations

import pytest
import torch
from optitrainer_lomo.optim import AdaLomo, Lomo

from optitrainer.testing import TINY_VOCAB, tiny_llama


def _groups(model):
    return [
        {"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 0.1},
        {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0},
    ]


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("tied", [False, True])
def test_rebuilt_clipping_is_bit_identical_to_two_passes(cls, tied):
    torch.manual_seed(0)
    batches = [torch.randint(0, TINY_VOCAB, (4, 16)) for _ in range(3)]
    two_pass_model, model = tiny_llama(tie_word_embeddings=tied), tiny_llama(tie_word_embeddings=tied)
    two_pass = cls(_groups(two_pass_model), lr=0.05)
    rebuilding = cls(_groups(model), lr=0.05, model=model)
    autograd_grads = {"q": [], "embed": []}
    model.model.layers[0].self_attn.q_proj.weight.register_post_accumulate_grad_hook(
        lambda p: autograd_grads["q"].append(1)
    )
    model.model.embed_tokens.weight.register_post_accumulate_grad_hook(
        lambda p: autograd_grads["embed"].append(1)
    )
    for batch in batches:
        ref = two_pass.fused_backward(
            two_pass_model(input_ids=batch, labels=batch).loss, 0.05, max_grad_norm=0.5
        )
        norm = rebuilding.fused_backward(model(input_ids=batch, labels=batch).loss, 0.05, max_grad_norm=0.5)
        assert norm == ref and norm > 0.5  # the same pre-clip norm, and clipping engaged
    for (name, a), b in zip(two_pass_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), f"{name} differs by {(a - b).abs().max():g}"
    assert len(autograd_grads["q"]) == len(batches)  # rebuilt: autograd computed it in the norm pass only
    # a tied embedding (shared with the head) too: the sum of its two rebuilt contributions
    assert len(autograd_grads["embed"]) == len(batches)


def test_activation_checkpointing_keeps_the_two_pass_method():
    """Recorded inputs would outlive checkpointing's recomputation: the model is differentiated twice."""
    batch = torch.randint(0, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    models = [tiny_llama(), tiny_llama()]
    for m in models:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    two_pass, rebuilding = (
        Lomo(_groups(models[0]), lr=0.05),
        Lomo(_groups(models[1]), lr=0.05, model=models[1]),
    )
    fired = []
    models[1].model.layers[0].self_attn.q_proj.weight.register_post_accumulate_grad_hook(
        lambda p: fired.append(1)
    )
    ref = two_pass.fused_backward(models[0](input_ids=batch, labels=batch).loss, 0.05, max_grad_norm=0.5)
    norm = rebuilding.fused_backward(models[1](input_ids=batch, labels=batch).loss, 0.05, max_grad_norm=0.5)
    assert norm == ref and len(fired) == 2
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
