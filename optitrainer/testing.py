"""Tools to test optimizers and plugins offline: a tiny Llama, generated data, and run helpers.

A plugin author runs the same checks the core runs over its built-ins::

    from optitrainer.testing import run_training, assert_same_run
    a = run_training("my_adam", tmp_path / "a", steps=20)
    b = run_training("adamw_torch", tmp_path / "b", steps=20)

Everything here works on CPU in float32 and downloads nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

TINY_VOCAB = 97


def tiny_llama_config(**overrides: Any):
    """A Llama config small enough to train for dozens of steps in a second on a CPU."""
    from transformers import LlamaConfig

    cfg = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, **config_overrides: Any):
    """A freshly initialised tiny ``LlamaForCausalLM`` (deterministic for a given seed)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides))
    return model.float()


class SyntheticLMDataset(torch.utils.data.Dataset):
    """Token sequences with learnable structure (noisy arithmetic progressions), generated from a seed."""

    def __init__(self, n: int = 256, seq_len: int = 16, vocab_size: int = TINY_VOCAB, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab_size, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        ids = (start + stride * torch.arange(seq_len)) % vocab_size
        noise = torch.rand(n, seq_len, generator=g) < 0.1
        ids = torch.where(noise, torch.randint(0, vocab_size, (n, seq_len), generator=g), ids)
        self.input_ids = ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@dataclass
class RunResult:
    """What a short training run produced."""

    losses: list[float]
    learning_rates: list[float]
    grad_norms: list[float | None]
    params: dict[str, torch.Tensor]
    trainer: Any = field(repr=False)
    eval_losses: list[float] = field(default_factory=list)


def training_arguments(output_dir: str | os.PathLike, *, arguments_cls=None, **overrides: Any):
    """Deterministic, quiet, CPU training arguments for tests (override anything)."""
    if arguments_cls is None:
        from .arguments import OptiTrainingArguments as arguments_cls
    kwargs = {
        "output_dir": str(output_dir),
        "max_steps": 20,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "data_seed": 0,
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return arguments_cls(**kwargs)


def run_training(
    optim: str,
    output_dir: str | os.PathLike,
    *,
    steps: int = 20,
    trainer_cls=None,
    arguments_cls=None,
    model=None,
    dataset=None,
    eval_dataset=None,
    resume_from_checkpoint: str | bool | None = None,
    **args_overrides: Any,
) -> RunResult:
    """Train ``model`` (default: :func:`tiny_llama`) with ``optim`` and return losses, lrs and final params.

    ``trainer_cls``/``arguments_cls`` default to :class:`~optitrainer.OptiTrainer` and
    :class:`~optitrainer.OptiTrainingArguments`; pass ``transformers.Trainer``/``TrainingArguments``
    to get the reference run.
    """
    if trainer_cls is None:
        from .trainer import OptiTrainer as trainer_cls
    args = training_arguments(
        output_dir, arguments_cls=arguments_cls, optim=optim, max_steps=steps, **args_overrides
    )
    model = tiny_llama() if model is None else model
    dataset = SyntheticLMDataset() if dataset is None else dataset
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    history = trainer.state.log_history
    steps_logged = [h for h in history if "loss" in h and "step" in h]
    return RunResult(
        losses=[h["loss"] for h in steps_logged],
        learning_rates=[h.get("learning_rate") for h in steps_logged],
        grad_norms=[h.get("grad_norm") for h in steps_logged],
        params={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        trainer=trainer,
        eval_losses=[h["eval_loss"] for h in history if "eval_loss" in h],
    )


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two parameter dicts with the same names."""
    assert a.keys() == b.keys(), f"different parameter names: {sorted(set(a) ^ set(b))[:5]}"
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def assert_same_run(a: RunResult, b: RunResult, *, atol: float = 0.0, params: bool = True) -> None:
    """Assert two runs have the same losses (and final parameters), within ``atol`` (0: identical)."""
    assert len(a.losses) == len(b.losses) and a.losses, (len(a.losses), len(b.losses))
    dl = max(abs(x - y) for x, y in zip(a.losses, b.losses))
    assert dl <= atol, f"losses differ by up to {dl:g}:\n{a.losses}\n{b.losses}"
    if params:
        dp = max_param_diff(a.params, b.params)
        assert dp <= atol, f"final parameters differ by up to {dp:g}"


def assert_learns(result: RunResult, *, min_drop: float = 0.05) -> None:
    """The loss went down and stayed finite."""
    assert all(math.isfinite(x) for x in result.losses), result.losses
    first, last = _mean(result.losses[:3]), _mean(result.losses[-3:])
    assert last < first * (1 - min_drop), f"loss did not drop: {first:.4f} -> {last:.4f}"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)
