"""OptiTrainer under the Trainer's own FSDP2 path (accelerate's ``fully_shard`` preparation): CPU, gloo, 2 ranks.

Three launches::

    python fsdp2_trainer.py OUT reference                      # one process, no FSDP, the same global batch
    torchrun --nproc_per_node 2 fsdp2_trainer.py OUT train     # every case, STEPS steps, checkpoint at SAVE_AT
                                                               # (first: what stock accelerate gives, no shim)
    torchrun --nproc_per_node 2 fsdp2_trainer.py OUT resume    # fresh processes resume checkpoint-SAVE_AT

Each run writes ``OUT/<case>.<run>.rank<r>.pt`` (``run``: ``train``, ``resume``; the reference writes
``OUT/<case>.reference.pt``): the full weights gathered with ``get_model_state_dict(...,
full_state_dict=True)``, and the Trainer's logged losses, grad norms and learning rates.

The Trainer is configured as a user would (``fsdp=True``, ``fsdp_config={"version": 2, ...}``,
``use_cpu=True``, ``ddp_backend="gloo"``). One test-only shim, :func:`let_accelerate_run_fsdp_on_cpu`, is
needed: accelerate's ``AcceleratorState`` turns ``distributed_type`` into ``FSDP`` only for the GPU-like
multi-device types (``accelerate/state.py``, the ``elif self.distributed_type in [MULTI_GPU, ...]``
branch of ``AcceleratorState.__init__``), so with ``use_cpu`` (``MULTI_CPU``) the plugin is dropped and
the Trainer silently runs DDP. The shim runs that same branch's assignments for ``MULTI_CPU``; everything
after (``Accelerator.prepare`` -> ``_prepare_fsdp2`` -> ``fsdp2_prepare_model`` -> ``fully_shard``,
accelerate's clipping, FSDP checkpointing, the Trainer's FSDP handling) is the stock code.

Importing this module is cheap (no torch): ``tests/test_fsdp2_trainer.py`` reads the cases from it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

STEPS = 4
SAVE_AT = 2
GLOBAL_BATCH = 4
LR = 1e-2
MODEL = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 128, "num_hidden_layers": 2}

#: name -> OptiTrainingArguments overrides
CASES: dict[str, dict[str, Any]] = {
    "adamw": {"optim": "adamw_torch", "max_grad_norm": 1.0},
    "layerwise": {"optim": "adamw_torch_layerwise", "max_grad_norm": 0.0},
    "layerwise_clip": {"optim": "adamw_torch_layerwise", "max_grad_norm": 1.0},
    # accumulation with clipping: accelerate's no_sync on the first micro-batch, one backward on the last
    "layerwise_clip_accumulate": {
        "optim": "adamw_torch_layerwise",
        "max_grad_norm": 1.0,
        "gradient_accumulation_steps": 2,
    },
}


def let_accelerate_run_fsdp_on_cpu() -> None:
    """Test-only: let accelerate's ``AcceleratorState`` select FSDP for ``MULTI_CPU`` as it does for GPUs.

    ``AcceleratorState.__init__`` (accelerate 1.16, ``state.py`` lines 971-977) sets ``distributed_type =
    FSDP`` and keeps ``fsdp_plugin`` only inside ``elif self.distributed_type in [MULTI_GPU, MULTI_MLU,
    MULTI_SDAA, MULTI_MUSA, MULTI_NPU, MULTI_XPU, MULTI_HPU, MULTI_NEURON]:`` (lines 947-956):
    ``MULTI_CPU`` (``use_cpu=True`` under torchrun) falls through, the plugin the Trainer built from
    ``fsdp_config`` is dropped and the model gets DDP. After the stock ``__init__`` this makes the same
    assignments, for ``MULTI_CPU`` and a given plugin only (``Accelerator`` always passes one when FSDP is
    asked for: it builds it from ``ACCELERATE_USE_FSDP`` when none is given). Nothing else is changed; once
    accelerate selects FSDP on CPU itself, the state is no longer ``MULTI_CPU`` and this does nothing.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_fsdp_on_cpu", False):
        return

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        fsdp_plugin = kwargs.get("fsdp_plugin")  # Accelerator passes it by name (built from env if unset)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            # state.py, AcceleratorState.__init__, the multi-device branch, verbatim but for the type list
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__._fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


def fsdp_available_on_cpu() -> str | None:
    """Why FSDP2 cannot run here (torch too old, no gloo), or ``None``."""
    import torch
    import torch.distributed as dist
    from packaging.version import Version

    if Version(torch.__version__.split("+")[0]) < Version("2.7"):
        return f"torch {torch.__version__}: FSDP2 (fully_shard) on CPU needs torch >= 2.7"
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"no torch.distributed.fsdp.fully_shard: {e}"
    return None


def arguments(case: str, output_dir: Path, world: int, **overrides: Any):
    from optitrainer.testing import training_arguments

    kwargs: dict[str, Any] = {
        **CASES[case],
        "max_steps": STEPS,
        "per_device_train_batch_size": GLOBAL_BATCH // world,
        "learning_rate": LR,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "save_strategy": "steps",
        "save_steps": SAVE_AT,
        "save_only_model": False,
    }
    if world > 1:
        kwargs.update(
            ddp_backend="gloo",
            fsdp=True,
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "reshard_after_forward": True,
                "state_dict_type": "FULL_STATE_DICT",
            },
        )
    kwargs.update(overrides)
    return training_arguments(output_dir, **kwargs)


def run(case: str, out: Path, mode: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from optitrainer import OptiTrainer
    from optitrainer.testing import SyntheticLMDataset, tiny_llama

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    run_dir = out / f"{case}.{mode}"
    resume = None
    if mode == "resume":
        resume = str(out / f"{case}.train" / f"checkpoint-{SAVE_AT}")
    # resuming: another initialisation, so that the weights must come from the checkpoint
    model = tiny_llama(seed=1 if mode == "resume" else 0, **MODEL)
    args = arguments(case, run_dir, world)
    trainer = OptiTrainer(
        model=model, args=args, train_dataset=SyntheticLMDataset(vocab_size=MODEL["vocab_size"])
    )
    if world > 1:
        assert trainer.is_fsdp_enabled, "the Trainer did not take its FSDP path"
        assert trainer.opti_engine.mode == "fsdp2", trainer.opti_engine
    trainer.train(resume_from_checkpoint=resume)

    from torch.distributed.fsdp import FSDPModule

    sharded = isinstance(trainer.model, FSDPModule)
    assert sharded == (world > 1), f"model is {type(trainer.model).__name__}"
    if sharded:
        assert all(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    local = [p.to_local() if sharded else p for p in trainer.model.parameters()]
    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    history = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    result = {
        "params": {k: v.detach().clone() for k, v in state.items()},
        "steps": [h["step"] for h in history],
        "losses": [h["loss"] for h in history],
        "grad_norms": [h.get("grad_norm") for h in history],
        "learning_rates": [h.get("learning_rate") for h in history],
        "fsdp": sharded,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "engine": str(trainer.opti_engine),
        "optimizer": type(trainer._opti_optimizer).__name__,  # the plugin's, inside accelerate's wrapper
        "local_numel": sum(t.numel() for t in local),
        "numel": sum(v.numel() for v in state.values()),
    }
    tag = f"{case}.{mode}" + (f".rank{rank}" if world > 1 else "")
    torch.save(result, out / f"{tag}.pt")
    if dist.is_initialized():
        dist.barrier()


def probe_stock_accelerate(out: Path) -> None:
    """What the Trainer gets from stock accelerate for ``fsdp=True`` on CPU (before the shim): no FSDP."""
    import json
    import logging

    from optitrainer import OptiTrainer
    from optitrainer.testing import tiny_llama

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    kept = Keep()
    logging.getLogger("optitrainer").addHandler(kept)
    try:
        trainer = OptiTrainer(model=tiny_llama(**MODEL), args=arguments("adamw", out / "probe", world=2))
    finally:
        logging.getLogger("optitrainer").removeHandler(kept)
    found = {
        "warnings": kept.messages,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "fsdp_plugin_args": trainer.args.fsdp_plugin_args is not None,
        "engine": str(trainer.opti_engine),
    }
    rank = int(os.environ.get("RANK", "0"))
    (out / f"stock_accelerate.rank{rank}.json").write_text(json.dumps(found))


def main(out: Path, mode: str, cases: list[str]) -> None:
    if mode == "train":
        probe_stock_accelerate(out)
    if mode != "reference":
        let_accelerate_run_fsdp_on_cpu()
    for case in cases or list(CASES):
        try:
            run(case, out, mode)
        except BaseException:
            # the root cause, for the test to show (torchrun's output ends with the other rank's broken pipe)
            import traceback

            rank = os.environ.get("RANK", "0")
            (out / f"{case}.{mode}.error.rank{rank}.txt").write_text(traceback.format_exc())
            raise
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
