"""Run under ``torchrun --nproc_per_node 2``: ``lomo``/``adalomo`` trained by OptiTrainer under DDP.

``python dist_lomo.py OUT RUNS_JSON``; RUNS_JSON is a list of ``{"name", "optim", "args", "steps",
"resume_at"}``. Each rank writes ``OUT/<name>.rank<r>.pt``: its final parameters, the logged losses and
grad norms, the engine, and a digest of every batch it trained on (to show that the ranks saw different
data). With ``resume_at=k`` the run also saves a checkpoint at step k, and a fresh trainer resumes from
it to ``steps``: the file then holds both (``params`` straight, ``resumed_params`` resumed).
"""

import json
import os
import sys

import torch

from optitrainer import OptiTrainer
from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments

torch.set_num_threads(1)
out, runs = sys.argv[1], json.loads(open(sys.argv[2]).read())
rank = int(os.environ["RANK"])


def train(run, output_dir, resume=None, **extra):
    args = training_arguments(
        output_dir, optim=run["optim"], max_steps=run["steps"], **{**run.get("args", {}), **extra}
    )
    model = tiny_llama(seed=0)
    batches = []
    model.register_forward_pre_hook(
        lambda m, a, k: batches.append(k["input_ids"].tolist()) if m.training else None, with_kwargs=True
    )
    trainer = OptiTrainer(model=model, args=args, train_dataset=SyntheticLMDataset())
    trainer.train(resume_from_checkpoint=resume)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "losses": [h["loss"] for h in logs],
        "grad_norms": [h.get("grad_norm") for h in logs],
        "engine": str(trainer.opti_engine),
        "batches": batches,
    }


for run in runs:
    output_dir = os.path.join(out, run["name"])
    if run.get("resume_at"):
        k = run["resume_at"]
        result = train(run, output_dir, save_strategy="steps", save_steps=k)
        resumed = train(run, output_dir, resume=os.path.join(output_dir, f"checkpoint-{k}"))
        result.update({f"resumed_{key}": value for key, value in resumed.items()})
    else:
        result = train(run, output_dir)
    torch.save(result, os.path.join(out, f"{run['name']}.rank{rank}.pt"))
