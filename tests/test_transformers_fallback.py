"""Names no plugin provides are built by transformers' own ``Trainer.create_optimizer``, special cases included.

The bitsandbytes 8-bit names are the case in point: transformers keeps every ``nn.Embedding``'s
optimizer state in 32 bits (``GlobalOptimManager.register_module_override``), so a fallback that only
calls the handler trains to other numbers than ``transformers.Trainer``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from optitrainer import OptiTrainer, OptiTrainingArguments, get_optimizer
from optitrainer.registry import DISABLE_AUTOLOAD_ENV, REGISTRY
from optitrainer.testing import (
    SyntheticLMDataset,
    max_param_diff,
    run_training,
    tiny_llama,
    training_arguments,
)

bnb = pytest.importorskip("bitsandbytes")

# bitsandbytes runs these on CPU too (the paged ones fall back to plain buffers there)
EIGHT_BIT = ["adamw_bnb_8bit", "lion_8bit", "rmsprop_bnb_8bit"]


def _model():
    # an embedding of 97 x 64 = 6208 elements: above bitsandbytes' min_8bit_size (4096), so it would get
    # 8-bit states without transformers' override (the default tiny model's 97 x 32 stays 32-bit anyway)
    return tiny_llama(hidden_size=64, intermediate_size=128)


@pytest.fixture(autouse=True)
def core_only(monkeypatch):
    """Only the core's own names: the bitsandbytes names then fall back to transformers, even where the
    optitrainer-bitsandbytes plugin is installed (its own tests compare it with transformers)."""
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    REGISTRY.refresh()
    yield
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV)
    REGISTRY.refresh()


@pytest.fixture(autouse=True)
def fresh_bnb_manager():
    """bitsandbytes' GlobalOptimManager is process-wide and keys overrides by (group, index) too.

    An override registered by one trainer applies to the next optimizer with the same layout: without
    a reset, a run after the reference run would inherit its 32-bit embedding and hide the difference.
    """
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.initialize()
    yield manager
    manager.initialize()


def _state_dtypes(optimizer, param):
    return {k: v.dtype for k, v in optimizer.state[param].items() if k.startswith("state")}


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_8bit_fallback_trains_like_transformers(name, tmp_path, fresh_bnb_manager):
    assert get_optimizer(name).is_transformers_fallback
    a = run_training(name, tmp_path / "a", steps=6, model=_model())
    fresh_bnb_manager.initialize()
    b = run_training(
        name, tmp_path / "b", steps=6, model=_model(), trainer_cls=Trainer, arguments_cls=TrainingArguments
    )
    opt, model = a.trainer.optimizer, a.trainer.model
    # 32-bit states for the embedding, as transformers decides; 8-bit for the large linear weights
    assert set(_state_dtypes(opt, model.model.embed_tokens.weight).values()) == {torch.float32}
    assert set(_state_dtypes(opt, model.model.layers[0].mlp.up_proj.weight).values()) == {torch.uint8}
    assert a.losses == b.losses, (a.losses, b.losses)
    assert a.grad_norms == b.grad_norms
    assert max_param_diff(a.params, b.params) == 0.0


@pytest.mark.parametrize("arguments_cls", [OptiTrainingArguments, TrainingArguments])
def test_8bit_fallback_registers_the_embedding_override(arguments_cls, tmp_path, fresh_bnb_manager):
    """What transformers' own test_bnb_8bit_optimizer_skip_embedding checks, through OptiTrainer."""
    args = training_arguments(tmp_path, arguments_cls=arguments_cls, optim="adamw_bnb_8bit")
    model = _model()
    trainer = OptiTrainer(model=model, args=args, train_dataset=SyntheticLMDataset(n=8))
    optimizer = trainer.create_optimizer()
    assert type(optimizer).__module__.startswith("bitsandbytes")
    assert optimizer.mng.module_weight_config_triple == [
        (model.model.embed_tokens, "weight", {"optim_bits": 32})
    ]
