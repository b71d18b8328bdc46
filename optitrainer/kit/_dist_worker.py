"""Run under ``torchrun --nproc_per_node 2``: train every run of a JSON list with OptiTrainer, in turn.

``python _dist_worker.py OUT RUNS_JSON``. RUNS_JSON holds ``{"register": ["module:ATTR", ...], "runs":
[{"name", "optim", "args", "steps"}, ...]}``; each spec of ``register`` is registered in-process first
(plugins a test registered without an entry point). Each rank writes ``OUT/<name>.rank<r>.pt``: final
parameters (whole ones under ZeRO-3), logged losses, the engine that ran, or the error.

DeepSpeed on a machine without an accelerator needs two shims that leave the training math alone:
accelerate picks no process-group backend there (it gets gloo, which deepspeed.comm uses on CPU), and
DeepSpeed's CPU shared-memory op (used only by inference_all_reduce) is not JIT-compiled.
"""

import importlib
import json
import os
import sys
import traceback


def _deepspeed_on_cpu_shims() -> None:
    from accelerate.state import PartialState

    prepare = PartialState._prepare_backend

    def backend_for_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
        backend, distributed_type = prepare(self, cpu, sagemaker_dp, backend)
        if backend is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            backend = "gloo"
        return backend, distributed_type

    PartialState._prepare_backend = backend_for_cpu
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _whole_params(model):
    params = dict(model.named_parameters())
    if not any(hasattr(p, "ds_id") for p in params.values()):
        return {n: p.detach().clone() for n, p in params.items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def main() -> None:
    out, plan = sys.argv[1], json.loads(open(sys.argv[2]).read())
    import torch

    if any(run["args"].get("deepspeed") for run in plan["runs"]) and not torch.cuda.is_available():
        _deepspeed_on_cpu_shims()
    from optitrainer import register
    from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments
    from optitrainer.trainer import OptiTrainer

    for path in plan.get("register", []):
        module, _, attr = path.partition(":")
        register(getattr(importlib.import_module(module), attr), replace=True)
    rank = int(os.environ["RANK"])
    # a DeepSpeed run leaves its configuration in the process (accelerate's state, the environment),
    # which later runs would read as "launched with DeepSpeed": the plain DDP runs go first
    runs = sorted(plan["runs"], key=lambda run: bool(run["args"].get("deepspeed")))
    for run in runs:
        result: dict = {"error": None}
        try:
            args = training_arguments(
                os.path.join(out, run["name"]), optim=run["optim"], max_steps=run["steps"], **run["args"]
            )
            trainer = OptiTrainer(model=tiny_llama(seed=0), args=args, train_dataset=SyntheticLMDataset())
            trainer.train()
            logs = [h for h in trainer.state.log_history if "loss" in h]
            result.update(
                params=_whole_params(trainer.model),
                losses=[h["loss"] for h in logs],
                engine=str(trainer.opti_engine),
            )
        except Exception as exc:  # noqa: BLE001 - recorded and reported as the check's failure
            where = traceback.extract_tb(exc.__traceback__)[-1]
            result["error"] = f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
        torch.save(result, os.path.join(out, f"{run['name']}.rank{rank}.pt"))


if __name__ == "__main__":
    main()
