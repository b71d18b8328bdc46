"""OptiTrainer inside TRL's SFTTrainer, DPOTrainer and GRPOTrainer at their defaults (clipping on).

Each micro-batch is trained on exactly once (``compute_loss`` sees the same inputs, in the same order, as
with a standard optimizer), GRPO generates once per generation cycle, the logged counters are the
standard run's, and ``adamw_torch_layerwise`` reproduces ``adamw_torch``'s losses (exact clipping).
Tiny Llama, a word-level tokenizer built in code, generated data; nothing is downloaded.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import optitrainer  # noqa: E402
from optitrainer.testing import TINY_VOCAB, tiny_llama  # noqa: E402

WORDS = "good bad fine great poor nice dull bright calm loud red blue green one two three".split()
STEPS = 3
#: losses of adamw_torch_layerwise vs adamw_torch (float reordering of the clip; measured ≤ 1e-7)
LOSS_TOL = 1e-5


def make_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    assert len(vocab) <= TINY_VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def sft_data(n: int = 32) -> datasets.Dataset:
    rng = random.Random(0)
    return datasets.Dataset.from_dict({"text": [_sentence(rng, 4, 12) for _ in range(n)]})


def dpo_data(n: int = 32) -> datasets.Dataset:
    rng = random.Random(1)
    rows = [(_sentence(rng, 2, 5), _sentence(rng, 2, 6), _sentence(rng, 2, 6)) for _ in range(n)]
    return datasets.Dataset.from_dict(
        {"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows], "rejected": [r[2] for r in rows]}
    )


def grpo_data(n: int = 16) -> datasets.Dataset:
    rng = random.Random(2)
    return datasets.Dataset.from_dict({"prompt": [_sentence(rng, 2, 5) for _ in range(n)]})


def reward_first_words(completions, **_):
    """The share of the completion's words from the first half of the vocabulary (varies by sample)."""
    first = set(WORDS[: len(WORDS) // 2])
    return [sum(w in first for w in c.split()) / max(len(c.split()), 1) for c in completions]


def _trainer_classes(base):
    class Recording(optitrainer.OptiTrainerMixin, base):
        """Records each micro-batch ``compute_loss`` sees and each generation."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen: list[tuple[int, ...]] = []
            self.generations = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            ids = next(inputs[k] for k in ("input_ids", "completion_ids", "chosen_input_ids") if k in inputs)
            self.seen.append(tuple(int(x) for x in ids.sum(-1)))
            return super().compute_loss(model, inputs, *args, **kwargs)

        def _generate_and_score_completions(self, *args, **kwargs):
            self.generations += 1
            return super()._generate_and_score_completions(*args, **kwargs)

    return Recording


def _train(kind: str, optim: str, tmp_path, resume: str | None = None, **overrides):
    config_cls, trainer_cls, data, extra = {
        "sft": (trl.SFTConfig, trl.SFTTrainer, sft_data, {"max_length": 16}),
        "dpo": (trl.DPOConfig, trl.DPOTrainer, dpo_data, {"max_length": 16}),
        "grpo": (
            trl.GRPOConfig,
            trl.GRPOTrainer,
            grpo_data,
            # steps_per_generation=2: one generation serves two optimizer steps (its buffer is read in turn)
            {"num_generations": 4, "max_completion_length": 4, "steps_per_generation": 2},
        ),
    }[kind]
    settings = dict(
        output_dir=str(tmp_path / f"{kind}-{optim}"),
        optim=optim,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,  # the defaults (1e-6 .. 2e-5) would leave the losses where they start
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        **extra,
    )
    args = optitrainer.with_optitrainer(config_cls)(**{**settings, **overrides})
    assert args.max_grad_norm == 1.0  # TRL's default: clipping on
    trainer_kwargs = {"grpo": {"reward_funcs": reward_first_words}, "dpo": {"ref_model": tiny_llama()}}.get(
        kind, {}
    )
    trainer = _trainer_classes(trainer_cls)(
        model=tiny_llama(),
        args=args,
        train_dataset=data(),
        processing_class=make_tokenizer(),
        **trainer_kwargs,
    )
    trainer.train(resume_from_checkpoint=resume)
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    return trainer, logs


COUNTERS = ("num_tokens",)


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_trl_trainers_train_each_batch_once_and_layerwise_matches_standard(kind, tmp_path):
    std, std_logs = _train(kind, "adamw_torch", tmp_path)
    runs = {optim: _train(kind, optim, tmp_path) for optim in ("adamw_torch_layerwise", "lomo")}
    assert len(std.seen) == STEPS and len(set(std.seen)) > 1
    if kind == "grpo":
        assert std.generations == 2  # steps 1-2 from one generation, step 3 from the next
    for optim, (trainer, logs) in runs.items():
        assert trainer.seen == std.seen, f"{optim}: micro-batches differ from the standard run's"
        if kind == "grpo":
            assert trainer.generations == std.generations, optim
        assert len(logs) == len(std_logs) == STEPS
        for key in COUNTERS:
            if key in std_logs[0]:
                assert [h.get(key) for h in logs] == [h.get(key) for h in std_logs], (optim, key)
        assert all(h.get("grad_norm") is not None for h in logs), optim  # the real pre-clip norm
    lw_logs = runs["adamw_torch_layerwise"][1]
    assert [h["loss"] for h in lw_logs] == pytest.approx([h["loss"] for h in std_logs], abs=LOSS_TOL)
    assert [h["grad_norm"] for h in lw_logs] == pytest.approx([h["grad_norm"] for h in std_logs], rel=1e-5)
    assert all(h["grad_norm"] > 0 for h in std_logs)  # a real signal to train on
    if kind == "sft":
        assert any(h["grad_norm"] > 1.0 for h in std_logs)  # clipping really engaged
    final = dict(std.model.named_parameters())
    with torch.no_grad():
        lw_params = runs["adamw_torch_layerwise"][0].model.named_parameters()
        diff = max(float((p - final[n]).abs().max()) for n, p in lw_params)
    assert diff <= 1e-5, diff
    assert torch.isfinite(torch.tensor([h["loss"] for h in runs["lomo"][1]])).all()


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trl_checkpoints_load_in_a_fresh_process_and_resume_exactly(kind, tmp_path):
    """The README's recipe (``with_optitrainer(SFTConfig)``) in checkpoints: ``training_args.bin`` is written
    (a class made at run time used to fail pickling, leaving a half-written checkpoint), loads back in a
    process that never called ``with_optitrainer``, and training resumes to the uninterrupted run's numbers."""
    save = {"save_strategy": "steps", "save_steps": 2, "max_steps": 4}
    straight, straight_logs = _train(kind, "adamw_torch_layerwise", tmp_path / "straight", **save)
    ckpt = tmp_path / "straight" / f"{kind}-adamw_torch_layerwise" / "checkpoint-2"
    assert (ckpt / "training_args.bin").is_file()
    code = (
        "import torch, sys; a = torch.load(sys.argv[1], weights_only=False); print(type(a).__name__, a.optim)"
    )
    load = [sys.executable, "-c", code, str(ckpt / "training_args.bin")]
    out = subprocess.run(load, capture_output=True, text=True, check=True).stdout.split()
    assert out == [{"sft": "OptiSFTConfig", "dpo": "OptiDPOConfig"}[kind], "adamw_torch_layerwise"]
    resumed, resumed_logs = _train(
        kind, "adamw_torch_layerwise", tmp_path / "straight", resume=str(ckpt), **save
    )
    assert [h["loss"] for h in resumed_logs] == [h["loss"] for h in straight_logs]
    final = dict(straight.model.named_parameters())
    assert all(torch.equal(p, final[n]) for n, p in resumed.model.named_parameters())
