"""Run under ``torchrun --nproc_per_node N``: train a list of runs with OptiTrainer, one after another.

``python dist_train.py OUT RUNS_JSON``; RUNS_JSON is a list of ``{"name", "optim", "args", "steps",
"resume_at"}``. Each rank writes ``OUT/<name>.rank<r>.pt`` with its final parameters, logged losses and
grad norms, or the refusal text when the trainer refused the combination before training. With
``resume_at=k`` the run saves a checkpoint at step k, and a fresh trainer resumes from it to ``steps``.
"""

import json
import os
import sys

import torch

from optitrainer import IncompatibleConfigError, OptiTrainer
from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments

out, runs = sys.argv[1], json.loads(open(sys.argv[2]).read())
rank = int(os.environ["RANK"])


def train(run, output_dir, resume=None, **extra):
    args = training_arguments(
        output_dir, optim=run["optim"], max_steps=run.get("steps", 4), **{**run.get("args", {}), **extra}
    )
    trainer = OptiTrainer(model=tiny_llama(seed=0), args=args, train_dataset=SyntheticLMDataset())
    trainer.train(resume_from_checkpoint=resume)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "losses": [h["loss"] for h in logs],
        "grad_norms": [h.get("grad_norm") for h in logs],
        "engine": str(trainer.opti_engine),
    }


for run in runs:
    result = {"refused": None}
    output_dir = os.path.join(out, run["name"])
    try:
        if run.get("resume_at"):
            k = run["resume_at"]
            train(run, output_dir, save_strategy="steps", save_steps=k)
            result.update(train(run, output_dir, resume=os.path.join(output_dir, f"checkpoint-{k}")))
        else:
            result.update(train(run, output_dir))
    except IncompatibleConfigError as exc:
        result["refused"] = str(exc)
    torch.save(result, os.path.join(out, f"{run['name']}.rank{rank}.pt"))
