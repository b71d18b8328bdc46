"""Run under ``torchrun --nproc_per_node N``: train a list of runs with OptiTrainer, one after another.

``python dist_train.py OUT RUNS_JSON``; RUNS_JSON is a list of ``{"name", "optim", "args", "steps",
"resume_at"}``, optionally with ``"record_errors"`` and ``"arguments"``. Each rank writes
``OUT/<name>.rank<r>.pt`` with its final parameters, logged losses and grad norms, or the refusal text
when the trainer refused the combination before training. With ``resume_at=k`` the run saves a
checkpoint at step k, and a fresh trainer resumes from it to ``steps``.

Optional keys: ``"arguments": "transformers"`` builds plain ``transformers.TrainingArguments`` (not
``OptiTrainingArguments``); ``"record_errors": true`` records any other exception as ``error`` (with
where it was raised) and ``steps_done`` (optimizer steps completed; ``None`` when no trainer was
built), and goes on with the next run. Under DeepSpeed ZeRO-3 the recorded parameters are the whole
ones, gathered from every rank's partition.
"""

import json
import os
import sys
import traceback

import torch

from optitrainer import IncompatibleConfigError, OptiTrainer
from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments

out, runs = sys.argv[1], json.loads(open(sys.argv[2]).read())
rank = int(os.environ["RANK"])
#: the trainer of the run in progress (what a recorded error reports its step from)
current = {"trainer": None}


def whole_params(model):
    """Copies of the parameters; ZeRO-3 partitions them (``ds_id``), so gather them first (collective)."""
    params = dict(model.named_parameters())
    if not any(hasattr(p, "ds_id") for p in params.values()):
        return {n: p.detach().clone() for n, p in params.items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def train(run, output_dir, resume=None, **extra):
    arguments_cls = None
    if run.get("arguments") == "transformers":  # plain TrainingArguments: only the trainer checks
        from transformers import TrainingArguments as arguments_cls
    args = training_arguments(
        output_dir,
        arguments_cls=arguments_cls,
        optim=run["optim"],
        max_steps=run.get("steps", 4),
        **{**run.get("args", {}), **extra},
    )
    trainer = OptiTrainer(model=tiny_llama(seed=0), args=args, train_dataset=SyntheticLMDataset())
    current["trainer"] = trainer
    trainer.train(resume_from_checkpoint=resume)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "params": whole_params(trainer.model),
        "losses": [h["loss"] for h in logs],
        "grad_norms": [h.get("grad_norm") for h in logs],
        "engine": str(trainer.opti_engine),
        "wrapper": type(trainer.model_wrapped).__name__,
    }


for run in runs:
    result = {"refused": None}
    current["trainer"] = None
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
    except Exception as exc:  # noqa: BLE001 - only for runs that ask to record a crash and go on
        if not run.get("record_errors"):
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result["error"] = f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno} in {where.name})"
        trainer = current["trainer"]
        result["steps_done"] = None if trainer is None else trainer.state.global_step
    torch.save(result, os.path.join(out, f"{run['name']}.rank{rank}.pt"))
