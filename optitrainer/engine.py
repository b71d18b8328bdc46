"""Which distributed engine a run uses: one truthful picture, from the arguments and from the accelerator.

The engine may come from the training arguments (``deepspeed=``, ``fsdp=``), from accelerate's config
file or environment (``accelerate launch`` sets ``ACCELERATE_USE_DEEPSPEED``/``ACCELERATE_USE_FSDP``),
or from the launcher (``torchrun``, ``deepspeed``). :func:`engine_from_arguments` reads what is known
when the arguments are built; :func:`engine_from_accelerator` reads what actually runs, once the
trainer's accelerator exists (still before step 1). Both give an :class:`Engine` whose
:attr:`~Engine.mode` is matched against :attr:`optitrainer.plugin.Capabilities.distributed`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Engine",
    "deepspeed_launch_problem",
    "deepspeed_missing",
    "engine_from_accelerator",
    "engine_from_arguments",
    "launch_problem",
]


@dataclass(frozen=True)
class Engine:
    """A distributed engine: ``kind`` is ``"single"``, ``"ddp"``, ``"deepspeed"`` or ``"fsdp"``."""

    kind: str = "single"
    world_size: int = 1
    zero_stage: int | None = None
    fsdp_version: int | None = None
    #: where the engine was read from (shown in refusals: the setting to change)
    source: str = ""

    @property
    def mode(self) -> str | None:
        """The capability key: ``"ddp"``, ``"zero0"``…``"zero3"``, ``"fsdp1"``/``"fsdp2"``; ``None`` alone."""
        if self.kind == "ddp":
            return "ddp"
        if self.kind == "deepspeed":
            return f"zero{self.zero_stage if self.zero_stage is not None else 0}"
        if self.kind == "fsdp":
            return f"fsdp{self.fsdp_version or 1}"
        return None

    @classmethod
    def for_mode(cls, mode: str, world_size: int = 2, source: str = "") -> Engine:
        """The engine whose :attr:`mode` is ``mode`` (a key of ``optitrainer.plugin.ENGINE_MODES``)."""
        if mode == "ddp":
            return cls("ddp", world_size, source=source)
        if mode in ("zero0", "zero1", "zero2", "zero3"):
            return cls("deepspeed", world_size, zero_stage=int(mode[-1]), source=source)
        if mode in ("fsdp1", "fsdp2"):
            return cls("fsdp", world_size, fsdp_version=int(mode[-1]), source=source)
        raise ValueError(f"unknown engine {mode!r}: use ddp, zero0..zero3, fsdp1 or fsdp2")

    @property
    def is_distributed(self) -> bool:
        return self.kind != "single"

    def __str__(self) -> str:
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage if self.zero_stage is not None else 0}"
        if self.kind == "fsdp":
            return f"FSDP{self.fsdp_version or 1}"
        if self.kind == "ddp":
            return "DDP"
        return "one process"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in {"1", "true", "yes"}


def _zero_stage_of(config: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed config given as a dict, a JSON path or an HfDeepSpeedConfig."""
    config = getattr(config, "config", config)  # HfTrainerDeepSpeedConfig keeps the dict in .config
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
    if isinstance(config, dict):
        stage = config.get("zero_optimization", {}).get("stage", 0)
        return int(stage) if str(stage).isdigit() else None
    return None


def deepspeed_missing(deepspeed_config: Any) -> str | None:
    """Why ``deepspeed=`` cannot work (the package is not installed), or ``None``.

    Without the package transformers fails with an unrelated ``TypeError`` (its DeepSpeed config class
    falls back to ``object``); this says what is missing and how to install it.
    """
    import importlib.util

    try:
        installed = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        installed = False
    if installed or not deepspeed_config:
        return None
    stage = _zero_stage_of(deepspeed_config)
    engine = Engine("deepspeed", zero_stage=stage)
    return (
        f"deepspeed={deepspeed_config!r} asks for {engine}, but the deepspeed package is not installed: "
        "pip install 'optitrainer[deepspeed]' (DeepSpeed 0.19.x, the version optitrainer's ZeRO tests verified), "
        "or remove deepspeed= to train with DDP"
    )


def deepspeed_launch_problem(deepspeed_config: Any) -> str | None:
    """Why ``deepspeed=`` under ``torchrun`` on a machine without GPUs cannot train as one job, or ``None``.

    transformers gives accelerate no process-group backend for DeepSpeed there, so accelerate counts one
    process and every rank trains on the same batches (:func:`launch_problem` says so once the trainer
    exists). Known from the environment alone, so the arguments refuse it before DeepSpeed is imported,
    whose first import on a new machine compiles ops for minutes.
    """
    if not deepspeed_config or _env_true("ACCELERATE_USE_DEEPSPEED"):
        return None  # accelerate's DeepSpeed launch sets the backend itself
    if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2 or _accelerate_picks_a_backend():
        return None
    return (
        f"deepspeed={deepspeed_config!r} under a {os.environ['WORLD_SIZE']}-process launch on a machine without "
        "GPUs: transformers gives accelerate no process-group backend for DeepSpeed here, so it would count one "
        "process and every rank would train on the same batches. On CPU launch with `accelerate launch "
        "--config_file <DeepSpeed config> ... --ddp_backend gloo` (docs/distributed.md), or drop deepspeed= "
        "and pass --use_cpu --ddp_backend gloo for DDP"
    )


def _accelerate_picks_a_backend() -> bool:
    """Whether accelerate finds a process-group backend for this launch with none given (as for DeepSpeed)."""
    try:
        from accelerate.state import PartialState

        backend, _ = PartialState._prepare_backend(
            None, cpu=False, backend=None
        )  # reads only the environment
    except Exception:  # noqa: BLE001 - another accelerate: the device decides, as it does today
        import torch

        return torch.cuda.is_available()
    return backend is not None


def engine_from_arguments(args: Any) -> Engine:
    """The engine the arguments and the environment ask for (before the accelerator exists).

    ``args`` may be any ``TrainingArguments`` or a plain namespace with the same attributes.
    """
    world_size = int(getattr(args, "world_size", 1) or 1)
    if getattr(args, "deepspeed", None):
        stage = _zero_stage_of(getattr(args, "hf_deepspeed_config", None) or args.deepspeed)
        return Engine("deepspeed", world_size, zero_stage=stage, source="deepspeed=")
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None or (_env_true("ACCELERATE_USE_DEEPSPEED") and not getattr(args, "use_cpu", False)):
        stage = getattr(plugin, "zero_stage", None)
        if stage is None:
            stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
        return Engine("deepspeed", world_size, zero_stage=int(stage), source="accelerate's DeepSpeed config")
    if getattr(args, "fsdp", None):
        plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
        config = getattr(args, "fsdp_config", None) or {}
        version = plugin_args.get("fsdp_version", config.get("version", 1))
        return Engine("fsdp", world_size, fsdp_version=int(version), source="fsdp=")
    if _env_true("ACCELERATE_USE_FSDP") and not getattr(args, "use_cpu", False):
        version = int(os.environ.get("FSDP_VERSION", 1))
        return Engine("fsdp", world_size, fsdp_version=version, source="accelerate's FSDP config")
    if world_size > 1:
        return Engine("ddp", world_size, source="the launcher (WORLD_SIZE)")
    return Engine()


def engine_from_accelerator(accelerator: Any) -> Engine:
    """The engine the trainer's accelerator runs (the truth, whatever configured it)."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    world_size = int(getattr(accelerator, "num_processes", 1) or 1)
    dtype = accelerator.distributed_type
    if dtype == DistributedType.DEEPSPEED:
        plugin = getattr(state, "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None)
        return Engine("deepspeed", world_size, zero_stage=stage, source="the accelerator (DeepSpeed)")
    if dtype == DistributedType.FSDP:
        plugin = getattr(state, "fsdp_plugin", None)
        version = int(getattr(plugin, "fsdp_version", 1) or 1)
        return Engine("fsdp", world_size, fsdp_version=version, source="the accelerator (FSDP)")
    if world_size > 1:
        if dtype == DistributedType.NO:  # several processes, yet nothing keeps their weights in step
            return Engine("unsynchronized", world_size, source="the accelerator (no data-parallel engine)")
        return Engine("ddp", world_size, source="the accelerator")
    return Engine()


#: variables a launcher sets in every process it starts (torchrun/accelerate's torchrun-style launch,
#: the deepspeed launcher, Open MPI, MPICH/Intel MPI)
_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launch_problem(engine: Engine) -> str | None:
    """Why the processes the launcher started would not train as one data-parallel job, or ``None``.

    - ``accelerate launch`` with a multi-CPU config and no MPI launcher runs the script once, as one
      process: it only sets ``MASTER_ADDR``/``MASTER_PORT`` (which it does when ``num_processes > 1``)
      and no rank variables. Training would go on alone, silently.
    - On a machine without GPUs, ``torchrun`` without ``use_cpu=True`` gives accelerate no data-parallel
      engine: it splits the data over the ranks but wraps nothing, so each rank trains its own weights.
    - accelerate counting fewer processes than ``torch.distributed`` runs (DeepSpeed through ``torchrun``
      on CPU): every rank trains on the same batches.
    """
    if engine.kind == "unsynchronized":
        return (
            f"{engine.world_size} processes run but accelerate set up no data-parallel engine (distributed type "
            "NO): each rank would train its own copy of the weights on its own data. On a machine without GPUs "
            "pass use_cpu=True (--use_cpu) so that accelerate runs DDP over gloo"
        )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != engine.world_size:
        counts = (
            f"torch.distributed runs {dist.get_world_size()} processes but accelerate counts {engine.world_size} "
            f"({engine}): every rank would train on the same batches, each its own copy of the weights."
        )
        if engine.kind == "deepspeed" or _env_true("ACCELERATE_USE_DEEPSPEED"):
            return (
                f"{counts} With DeepSpeed on a machine without GPUs this comes from torchrun (accelerate picks no "
                "process-group backend for DeepSpeed there): launch with `accelerate launch --config_file "
                "<DeepSpeed config> ... --ddp_backend gloo`"
            )
        return (
            f"{counts} On a machine without GPUs pass --use_cpu --ddp_backend gloo (use_cpu=True, "
            "ddp_backend='gloo') so that accelerate runs DDP over gloo; on GPUs, check that torch sees them"
        )
    env = os.environ
    launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in env and "ACCELERATE_MIXED_PRECISION" in env
    if engine.is_distributed or not launched_by_accelerate or "MASTER_PORT" not in env:
        return None
    if any(name in env for name in _RANK_VARIABLES):
        return None
    return (
        "`accelerate launch` started this script as ONE process although its config asks for several "
        "(num_processes > 1): accelerate's multi-CPU launch needs an MPI launcher (mpirun_hostfile). Start the "
        "processes with `accelerate launch --multi_gpu --num_processes N script.py` (its torchrun-style launch; "
        "on CPU it runs with gloo) or `torchrun --nproc_per_node N script.py`, or set num_processes: 1 in the "
        "accelerate config to train on one process"
    )
