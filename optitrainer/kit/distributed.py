"""Claimed distributed engines, exercised: ONE ``torchrun`` (2 CPU ranks, gloo) trains every (form, engine).

Each run: both ranks must end with identical weights, equal to one process training on the same global
batch (float reordering only). DDP runs with ``use_cpu=True`` and gloo; DeepSpeed ZeRO-0..3 through the
``deepspeed=`` argument (with the CPU shims of ``_dist_worker``). FSDP needs GPUs under accelerate.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .result import FAILED, NOT_RUNNABLE, PASSED, CheckResult
from .rounding import NOISE_FACTOR, rounding_sensitivity

STEPS = 4
#: two half-batch gradients averaged vs one batch, 4 steps (DDP measured <= 1.3e-6, Muon 5.1e-5)
TOLERANCE = 1e-4
PER_RANK_BATCH = 2
LAUNCH_TIMEOUT_PER_RUN = 30.0
WORKER = Path(__file__).with_name("_dist_worker.py")


def check_name(engine: str) -> str:
    return f"distributed:{engine}"


def not_runnable_reason(engine: str) -> str | None:
    """Why ``engine`` cannot run on this machine, or ``None``."""
    if engine.startswith("fsdp"):
        import torch

        if torch.cuda.device_count() < 2:
            return (
                "accelerate runs FSDP only on GPUs (on CPU the same launch trains plain DDP); a 2-rank FSDP "
                f"run needs 2 GPUs, this machine has {torch.cuda.device_count()}"
            )
        return "FSDP runs through the Trainer are not automated by the kit yet (run them on your GPUs)"
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install 'optitrainer[deepspeed]')"
    return None


def engine_args(engine: str) -> dict[str, Any]:
    if engine == "ddp":
        return {"use_cpu": True, "ddp_backend": "gloo"}
    stage = int(engine[-1])
    return {
        "use_cpu": False,
        "deepspeed": {
            "zero_optimization": {"stage": stage},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        },
    }


@dataclass
class DistributedRun:
    optim: str
    engine: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.optim}.{self.engine}"

    def train_args(self) -> dict[str, Any]:
        return {
            "per_device_train_batch_size": PER_RANK_BATCH,
            "warmup_steps": 1,
            "weight_decay": 0.01,
            **self.args,
            **engine_args(self.engine),
        }


def registration_path(spec) -> str | None:
    """``module:ATTR`` of a module-level object that is ``spec`` (for specs registered in-process)."""
    module = sys.modules.get(getattr(spec.factory, "__module__", ""), None)
    for mod in [module, *list(sys.modules.values())]:
        for attr, value in list(vars(mod).items()) if mod is not None else []:
            if value is spec:
                return f"{mod.__name__}:{attr}"
    return None


def run_distributed(runs: list[DistributedRun], out_dir: str | os.PathLike) -> list[CheckResult]:
    """Launch one ``torchrun`` for ``runs``, train the one-process references here, compare."""
    from ..registry import REGISTRY

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.rank*.pt"):  # a crashed rank must not leave an older result readable
        stale.unlink()
    register, results, launched = [], [], []
    for run in runs:
        resolved = REGISTRY.resolve(run.optim, check_installed=False)
        if resolved.provenance.distribution == "<in-process>":
            path = registration_path(resolved.spec)
            if path is None:
                results.append(
                    CheckResult(
                        run.optim,
                        check_name(run.engine),
                        NOT_RUNNABLE,
                        "registered in-process from no module-level name the launched ranks can import; "
                        "register the spec at module level or through an entry point",
                    )
                )
                continue
            register.append(path)
        launched.append(run)
    if not launched:
        return results
    plan = {
        "register": sorted(set(register)),
        "runs": [
            {"name": r.name, "optim": r.optim, "args": r.train_args(), "steps": STEPS} for r in launched
        ],
    }
    (out / "runs.json").write_text(json.dumps(plan))
    output = _torchrun(out, timeout=60 + LAUNCH_TIMEOUT_PER_RUN * len(launched))
    for run in launched:
        results.append(_compare(run, out, output))
    return results


def _torchrun(out: Path, timeout: float) -> str:
    from ..torchrun import run_torchrun

    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code, text = run_torchrun([WORKER, out, out / "runs.json"], nproc=2, timeout=timeout, env=env)
    if code is None:
        text += f"\n[torchrun killed after {timeout:.0f}s]"
    return text


def _compare(run: DistributedRun, out: Path, output: str) -> CheckResult:
    import torch

    from ..testing import max_param_diff, run_training

    check = check_name(run.engine)
    files = [out / f"{run.name}.rank{r}.pt" for r in (0, 1)]
    if not all(f.exists() for f in files):
        return CheckResult(
            run.optim, check, FAILED, "the 2-rank run left no result; torchrun said:\n" + output[-2000:]
        )
    ranks = [torch.load(f, weights_only=False) for f in files]
    errors = [r["error"] for r in ranks if r["error"]]
    if errors:
        return CheckResult(run.optim, check, FAILED, f"the 2-rank run failed: {errors[0]}")
    if ranks[0]["engine"].split()[0] not in ("DDP", "DeepSpeed"):
        return CheckResult(run.optim, check, FAILED, f"ran under {ranks[0]['engine']}, not {run.engine}")
    between = max_param_diff(ranks[0]["params"], ranks[1]["params"])
    if between != 0.0:
        return CheckResult(
            run.optim,
            check,
            FAILED,
            f"the 2 ranks end {between:.3g} apart under {ranks[0]['engine']}: their "
            "updates depend on the rank's data (gradients not averaged before the update?)",
        )
    args = {k: v for k, v in run.train_args().items() if k not in ("ddp_backend", "deepspeed")}
    args["per_device_train_batch_size"] = 2 * PER_RANK_BATCH
    args["use_cpu"] = True
    ref = run_training(run.optim, out / f"{run.name}.one_process", steps=STEPS, **args)
    diff = max_param_diff(ranks[0]["params"], ref.params)
    if diff <= TOLERANCE:
        return CheckResult(run.optim, check, PASSED, f"ranks identical, {diff:.2g} from one process")
    # two half-batch gradients averaged are the same sums in another order: an update that amplifies
    # rounding (Newton-Schulz, eigendecompositions) lands further away, correctly; measure how far
    noise, _ = rounding_sensitivity(run.optim, out / f"{run.name}.jitter", ref, steps=STEPS, **args)
    if diff <= NOISE_FACTOR * noise:
        return CheckResult(
            run.optim,
            check,
            PASSED,
            f"ranks identical, {diff:.2g} from one process; the update amplifies rounding: a start "
            f"one rounding step away lands {noise:.2g} from it",
        )
    return CheckResult(
        run.optim,
        check,
        FAILED,
        f"2 ranks under {ranks[0]['engine']} end {diff:.3g} away from one process "
        f"with the same global batch (tolerance {TOLERANCE:g}; a start one rounding step away "
        f"lands only {noise:.3g} away): the optimizer is not right under this engine; remove it from "
        "Capabilities.distributed",
    )
