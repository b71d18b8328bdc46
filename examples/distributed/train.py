"""Train a tiny Llama on generated data with OptiTrainer, under any launcher (offline, CPU or GPU).

Every command of docs/distributed.md runs this script, e.g. two DDP ranks on CPU::

    torchrun --nproc_per_node 2 examples/distributed/train.py --optim adamw_torch_layerwise \\
        --output_dir out/ddp --max_steps 4 --use_cpu --ddp_backend gloo

Every ``TrainingArguments`` option is accepted (``--optim``, ``--optim_args``, ``--deepspeed``,
``--gradient_accumulation_steps``…), plus the few of :class:`ScriptArguments`. Each rank prints one
line at the end: the engine that ran, the final loss, and a checksum of the whole (gathered) weights,
so the ranks of a data-parallel run can be seen to hold the same model.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from transformers import HfArgumentParser

from optitrainer import OptiTrainer, OptiTrainingArguments
from optitrainer.testing import SyntheticLMDataset, tiny_llama


@dataclass
class ScriptArguments:
    samples: int = 256  # generated training sequences (noisy arithmetic progressions)
    seq_len: int = 16
    model_seed: int = 0  # every rank builds the same initial weights


def weights_checksum(trainer: OptiTrainer) -> float:
    """The sum of every weight, gathered where the engine shards them (collective: every rank calls it)."""
    params = list(trainer.model.parameters())
    gather = None
    if trainer.opti_engine.mode == "zero3":
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather if gather is not None else torch.no_grad():
        total = 0.0
        for p in params:
            p = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
            total += float(p.detach().double().sum())
    return total


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, OptiTrainingArguments))
    parser.set_defaults(
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,  # every weight of the tiny Llama gets a gradient
    )
    script, args = parser.parse_args_into_dataclasses()
    trainer = OptiTrainer(
        model=tiny_llama(seed=script.model_seed),
        args=args,
        train_dataset=SyntheticLMDataset(n=script.samples, seq_len=script.seq_len),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    line = (
        f"[rank {rank}/{world}] engine={trainer.opti_engine} optim={args.optim} "
        f"steps={trainer.state.global_step} loss={losses[-1] if losses else float('nan'):.4f} "
        f"accelerator_processes={trainer.accelerator.num_processes} "
        f"weights_checksum={weights_checksum(trainer):.6f}\n"
    )
    sys.stdout.write(line)  # one write: the ranks share the launcher's output, lines must not interleave
    sys.stdout.flush()


if __name__ == "__main__":
    main()
