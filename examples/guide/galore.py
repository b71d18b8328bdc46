"""The GaLore examples of the transformers "Optimizers" guide, run offline with OptiTrainer.

Differences from the guide: the model is a tiny Llama built from a config (instead of
google/gemma-2b), the dataset is a small generated text dataset (instead of imdb) with a word-level
tokenizer built on the spot, training stops after 3 steps, on the CPU. Everything else -- optim,
optim_target_modules, optim_args, gradient_checkpointing -- is the guide's.

    python examples/guide/galore.py
"""

from __future__ import annotations

import os
import random
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import trl  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import optitrainer  # noqa: E402
from optitrainer.testing import TINY_VOCAB, tiny_llama  # noqa: E402

OptiSFTConfig = optitrainer.with_optitrainer(trl.SFTConfig)


class OptiSFTTrainer(optitrainer.OptiTrainerMixin, trl.SFTTrainer):
    """TRL's SFTTrainer whose optimizer comes from an optitrainer plugin."""


WORDS = (
    "the a this that movie film story plot actor actress scene music ending was is were felt truly "
    "very quite not never great good bad awful boring brilliant moving funny slow long short fun "
    "dull loved hated enjoyed watched again and but so"
).split()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (fits the tiny Llama's vocabulary)."""
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    assert len(vocab) <= TINY_VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def make_dataset(n: int = 64, seed: int = 0) -> datasets.Dataset:
    """Short "reviews" (stand-in for imdb's text column)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(n)]
    return datasets.Dataset.from_dict({"text": texts})


def train(optim: str, output_dir: str) -> float:
    train_dataset = make_dataset()
    args = OptiSFTConfig(
        output_dir=output_dir,
        max_steps=3,  # guide: 100
        optim=optim,
        optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
        optim_args="rank=64, update_proj_gap=100, scale=0.10",
        gradient_checkpointing=True,
        # offline / CPU / quiet
        per_device_train_batch_size=4,
        max_length=32,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = OptiSFTTrainer(
        model=tiny_llama(),  # guide: "google/gemma-2b"
        args=args,
        train_dataset=train_dataset,
        processing_class=make_tokenizer(),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    print(
        f"{optim}: {type(optimizer).__name__}, losses {[round(x, 4) for x in losses]}, final loss {losses[-1]:.4f}"
    )
    return losses[-1]


def main() -> None:
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        # "GaLore optimizer"
        train("galore_adamw", os.path.join(tmp, "test-galore"))
        # "GaLore optimizer with layerwise optimization"
        train("galore_adamw_layerwise", os.path.join(tmp, "test-galore-layerwise"))


if __name__ == "__main__":
    main()
