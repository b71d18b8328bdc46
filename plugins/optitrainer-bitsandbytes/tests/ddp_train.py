"""Run under ``torchrun --nproc_per_node 2``: ``python ddp_train.py OUT RUNS_JSON``.

RUNS_JSON is a list of ``{"name", "optim", "args", "resume_at"}``; each rank trains 4 steps with
OptiTrainer (gloo) and writes ``OUT/<name>.rank<r>.pt`` (final parameters, losses, engine). With
``resume_at=k`` it saves a checkpoint at step k and a fresh trainer resumes from it.
"""

import json
import os
import sys

import torch

from optitrainer import OptiTrainer
from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments

out, runs = sys.argv[1], json.loads(open(sys.argv[2]).read())
rank = int(os.environ["RANK"])


def train(run, output_dir, resume=None, **extra):
    args = training_arguments(output_dir, optim=run["optim"], max_steps=4, **{**run["args"], **extra})
    trainer = OptiTrainer(model=tiny_llama(seed=0), args=args, train_dataset=SyntheticLMDataset())
    trainer.train(resume_from_checkpoint=resume)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "losses": [h["loss"] for h in logs],
        "engine": str(trainer.opti_engine),
    }


for run in runs:
    output_dir = os.path.join(out, run["name"])
    if run.get("resume_at"):
        k = run["resume_at"]
        train(run, output_dir, save_strategy="steps", save_steps=k)
        result = train(run, output_dir, resume=os.path.join(output_dir, f"checkpoint-{k}"))
    else:
        result = train(run, output_dir)
    torch.save(result, os.path.join(out, f"{run['name']}.rank{rank}.pt"))
