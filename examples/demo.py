"""Train a tiny Llama on a bundled text corpus with a few optimizers and compare them.

    python examples/demo.py                                   # adamw_torch, adamw_torch_layerwise, muon
    python examples/demo.py --optim adamw_torch,galore_adamw_layerwise,adalomo --steps 100

Offline: the model is built from a config, the text is read from a local file (byte-level tokens).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from optitrainer import OptiTrainer, OptiTrainingArguments, get_optimizer
from optitrainer.testing import tiny_llama

CORPUS = Path(__file__).with_name("data") / "corpus.txt"


class ByteBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of ``seq_len`` bytes of a text file, as causal-LM examples."""

    def __init__(self, data: bytes, seq_len: int):
        ids = torch.tensor(list(data), dtype=torch.long)
        n = len(ids) // seq_len
        self.blocks = ids[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def load_corpus(path: Path, seq_len: int, eval_fraction: float = 0.1) -> tuple[ByteBlocks, ByteBlocks]:
    data = path.read_bytes()
    cut = int(len(data) * (1 - eval_fraction))
    return ByteBlocks(data[:cut], seq_len), ByteBlocks(data[cut:], seq_len)


def train_one(optim: str, args_ns, train, evaluation, out_dir: str) -> dict:
    resolved = get_optimizer(optim)  # fails early, with the fix, for a typo or a missing plugin
    extra = {}
    if resolved.spec.capabilities.needs_target_modules:
        extra["optim_target_modules"] = "all-linear"
    if resolved.spec.capabilities.owns_backward:
        extra["max_grad_norm"] = 0.0
    args = OptiTrainingArguments(
        output_dir=out_dir,
        optim=optim,
        max_steps=args_ns.steps,
        per_device_train_batch_size=args_ns.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=args_ns.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args_ns.steps // 10),
        logging_steps=max(1, args_ns.steps // 10),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=False,  # a progress bar per run
        **extra,
    )
    model = tiny_llama(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        max_position_embeddings=256,
    )
    trainer = OptiTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"]
    return {
        "optim": optim,
        "provider": str(resolved.provenance),
        "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1],
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss),
        "seconds": seconds,
        "steps_per_s": result.global_step / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--optim", default="adamw_torch,adamw_torch_layerwise,muon")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)"
    )
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)

    console = Console(width=max(Console().width, 110))
    train, evaluation = load_corpus(ns.corpus, ns.seq_len)
    console.print(
        f"corpus: {ns.corpus.name}, {len(train)} train / {len(evaluation)} eval blocks of {ns.seq_len} bytes"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, optim in enumerate(o.strip() for o in ns.optim.split(",") if o.strip()):
            console.print(f"[bold]training with optim={optim!r}[/bold] ({ns.steps} steps)")
            rows.append(train_one(optim, ns, train, evaluation, f"{tmp}/{i}"))

    table = Table(title=f"tiny Llama, {ns.steps} steps, lr {ns.lr:g}, cosine schedule")
    for col in (
        "optimizer",
        "provided by",
        "final train loss",
        "eval loss",
        "eval ppl",
        "time (s)",
        "steps/s",
    ):
        table.add_column(col, justify="left" if col in ("optimizer", "provided by") else "right")
    for r in sorted(rows, key=lambda r: r["eval_loss"]):
        table.add_row(
            r["optim"],
            r["provider"],
            f"{r['train_loss']:.3f}",
            f"{r['eval_loss']:.3f}",
            f"{r['perplexity']:.1f}",
            f"{r['seconds']:.1f}",
            f"{r['steps_per_s']:.1f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
