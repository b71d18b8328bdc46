"""The layerwise engine under FSDP2 (``fully_shard``), without the Trainer: CPU, gloo, 2 ranks.

Run under ``torchrun --nproc_per_node 2``::

    python fsdp2_layerwise.py OUT train    # every case of CASES, 4 steps; DCP checkpoints after step 2
    python fsdp2_layerwise.py OUT resume   # fresh processes: load those checkpoints, train steps 3-4

Each rank writes ``OUT/<case>.rank<r>.pt`` (``<case>.resumed.rank<r>.pt`` when resuming): the final
parameters gathered with ``full_tensor()``, the losses and the engine's logged grad norms. Before
sharding anything, ``train`` also trains the one-process references (no FSDP, the same global batches,
the same engine), rank 0 on the whole batch, rank 1 on the batch split as the ranks split it:
``OUT/reference.<full|split>.pt``.

Every optimizer step takes a global batch of 4 sequences (rank r its half), the learning rate decays
linearly from step to step, written into the engine's param groups as a scheduler does.

Importing this module is cheap (torch only): ``tests/test_fsdp2.py`` reads the cases from it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch

STEPS = 4
SAVE_AT = 2  # the resumable cases save a checkpoint after this many steps
LR = 1e-2
GLOBAL_BATCH = 4

#: name -> optimizer, optim_args, max_grad_norm, micro-batches per step, and how the model is prepared
CASES: dict[str, dict[str, Any]] = {
    "adamw": {"optim": "adamw_torch", "max_grad_norm": 0.0},
    # 0.5 so that the clip is active at every step (the tiny model's gradient norm is about 1.1)
    "adamw_clip": {"optim": "adamw_torch", "max_grad_norm": 0.5},
    "sgd_momentum": {"optim": "sgd", "optim_args": "momentum=0.9", "max_grad_norm": 0.0},
    # one forward/backward per step: the hooks keep their shard gradients until the norm is known
    "adamw_clip_hold": {"optim": "adamw_torch", "max_grad_norm": 0.5, "clipping": "hold"},
    # and with accumulation: the last micro-batch's hooks measure and keep the accumulated shards
    "accumulate_clip_hold": {
        "optim": "adamw_torch",
        "max_grad_norm": 0.5,
        "micro_batches": 2,
        "clipping": "hold",
    },
    # the Trainer's way: no reduce-scatter on the first micro-batch (set_requires_gradient_sync(False))
    "accumulate": {"optim": "adamw_torch", "max_grad_norm": 0.0, "micro_batches": 2},
    # reduce-scatter on every micro-batch: the hooks see the first shard gradient and must keep it
    "accumulate_reduce_each": {
        "optim": "adamw_torch",
        "max_grad_norm": 0.0,
        "micro_batches": 2,
        "reduce_each_micro_batch": True,
    },
    # the Trainer's order under accelerate's FSDP2: the optimizer is built on the whole model, then
    # accelerate shards the model and swaps the optimizer's parameters for the sharded ones
    "built_before_sharding": {"optim": "adamw_torch", "max_grad_norm": 0.5, "build_before_sharding": True},
}
RESUMED = ("adamw", "adamw_clip", "sgd_momentum")
#: the cases with the same settings train the same reference
REFERENCE_OF = {
    "accumulate_reduce_each": "accumulate",
    "built_before_sharding": "adamw_clip",
    "adamw_clip_hold": "adamw_clip",
}


def lr_at(step: int) -> float:
    return LR * (1 - step / STEPS)


def build_engine(model: torch.nn.Module, case: dict[str, Any]):
    """The engine exactly as the trainer builds it for ``<optim>_layerwise``."""
    from optitrainer.layerwise import build_layerwise
    from optitrainer.options import parse_optim_args
    from optitrainer.plugin import BuildContext
    from optitrainer.registry import REGISTRY
    from optitrainer.testing import training_arguments

    resolved = REGISTRY.resolve(case["optim"] + "_layerwise")
    args = training_arguments("unused", learning_rate=LR, max_grad_norm=case["max_grad_norm"])
    ctx = BuildContext(
        model=model,
        args=args,
        options=parse_optim_args(resolved.spec, case.get("optim_args")),
        name=resolved.spec.name,
        layerwise=True,
    )
    return build_layerwise(
        resolved.spec, ctx, max_grad_norm=case["max_grad_norm"], clipping=case.get("clipping", "rebuild")
    )


def build_standard(model: torch.nn.Module, case: dict[str, Any]) -> torch.optim.Optimizer:
    """The plugin's standard (whole-model) optimizer, for the one-process reference."""
    from optitrainer.options import parse_optim_args
    from optitrainer.plugin import BuildContext
    from optitrainer.registry import REGISTRY
    from optitrainer.testing import training_arguments

    resolved = REGISTRY.resolve(case["optim"])
    args = training_arguments("unused", learning_rate=LR, max_grad_norm=case["max_grad_norm"])
    ctx = BuildContext(
        model=model,
        args=args,
        options=parse_optim_args(resolved.spec, case.get("optim_args")),
        name=resolved.name,
    )
    return resolved.spec.factory(ctx)


@functools.cache
def _token_ids() -> torch.Tensor:
    from optitrainer.testing import SyntheticLMDataset

    return SyntheticLMDataset().input_ids


def batch(step: int, micro: int, micro_batches: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Rank ``rank``'s share of the global batch of micro-batch ``micro`` of optimizer step ``step``."""
    start = (step * micro_batches + micro) * GLOBAL_BATCH
    per_rank = GLOBAL_BATCH // world
    return _token_ids()[start + rank * per_rank : start + (rank + 1) * per_rank]


def train(
    model: torch.nn.Module,
    engine,
    case: dict[str, Any],
    steps: range,
    rank: int = 0,
    world: int = 1,
    on_step_end=None,
    split: int = 1,
) -> dict[str, list]:
    """Layerwise training steps: the trainer's ``run_training_step`` per micro-batch, scheduled lr.

    ``split=2`` on one process averages the losses of the batch's halves, as two ranks do.
    """
    n_micro = case.get("micro_batches", 1)
    sharded = world > 1
    losses, grad_norms, held = [], [], []
    for step in steps:
        for group in engine.param_groups:
            group["lr"] = lr_at(step)
        for micro in range(n_micro):
            ids = batch(step, micro, n_micro, rank, world)
            last = micro == n_micro - 1
            if sharded and not case.get("reduce_each_micro_batch"):
                model.set_requires_gradient_sync(last)  # what accelerate's no_sync does under FSDP2

            def forward_backward(ids=ids):
                parts = ids.chunk(split)
                loss = sum(model(input_ids=x, labels=x).loss for x in parts) / len(parts) / n_micro
                loss.backward()
                return loss.detach()

            before = None if last else [_local(p).clone() for p in model.parameters()]
            losses.append(float(engine.run_training_step(forward_backward, sync=last)))
            if not last:  # accumulating: no update yet; gradients kept (sharded ones only if reduced)
                assert all(torch.equal(b, _local(p)) for b, p in zip(before, model.parameters())), (
                    "stepped early"
                )
                held.append(sum(p.grad is not None for p in model.parameters()))
        grad_norms.append(engine.last_grad_norm)
        if on_step_end is not None:
            on_step_end(step)
    return {"losses": losses, "grad_norms": grad_norms, "grads_held_while_accumulating": held}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to_local() if hasattr(t, "to_local") else t.detach()


def train_standard(model: torch.nn.Module, case: dict[str, Any], steps: range) -> dict[str, list]:
    """The same run with the plugin's standard optimizer: backward, clip_grad_norm_, step, on one process."""
    opt = build_standard(model, case)
    n_micro = case.get("micro_batches", 1)
    losses, grad_norms = [], []
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        for micro in range(n_micro):
            ids = batch(step, micro, n_micro)
            loss = model(input_ids=ids, labels=ids).loss / n_micro
            loss.backward()
            losses.append(float(loss.detach()))
        norm = None
        if case["max_grad_norm"] > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), case["max_grad_norm"]))
        grad_norms.append(norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "grad_norms": grad_norms}


def one_process(name: str, standard: bool = False, split: int = 1) -> dict[str, Any]:
    """The reference: same model, same global batches, same engine (or the standard optimizer), no FSDP."""
    from optitrainer.testing import tiny_llama

    case = CASES[name]
    model = tiny_llama(seed=0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    if standard:
        out = train_standard(model, case, range(STEPS))
    else:
        engine = build_engine(model, case)
        out = train(model, engine, case, range(STEPS), split=split)
        engine.detach()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["moved"] = max((out["params"][n] - initial[n]).abs().max().item() for n in initial)
    return out


# ---- under torchrun ----------------------------------------------------------------------------------
def shard(model: torch.nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def prepare(case: dict[str, Any], mesh, seed: int = 0):
    from optitrainer.testing import tiny_llama

    model = tiny_llama(seed=seed)
    if not case.get("build_before_sharding"):
        shard(model, mesh)
        return model, build_engine(model, case)
    # accelerate's Accelerator._prepare_fsdp2: placeholders in the optimizer, fully_shard, then
    # fsdp2_switch_optimizer_parameters maps each placeholder (by the old data_ptr) to the sharded parameter
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    engine = build_engine(model, case)
    old = dict(model.named_parameters())
    for group in engine.param_groups:
        p = group["params"][0]
        placeholder = torch.empty(1, dtype=p.dtype)
        placeholder.data_ptr = p.data_ptr()
        group["params"][0] = placeholder
    shard(model, mesh)
    new = dict(model.named_parameters())
    fsdp2_switch_optimizer_parameters(engine, {old[n].data_ptr(): new[n] for n in old})
    return model, engine


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def main(out: Path, mode: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from optitrainer import release_gloo_workers_at_exit
    from optitrainer.distributed_checkpoint import load_sharded, save_sharded

    dist.init_process_group("gloo")
    release_gloo_workers_at_exit()  # no OptiTrainer.train here to register it
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "train":  # one process each, in parallel: rank 0 the whole batch, rank 1 the rank-split one
        kind = ("full", "split")[rank]
        references = {n: one_process(n, split=1 + rank) for n in sorted(set(CASES) - set(REFERENCE_OF))}
        if rank == 0:
            references["standard.adamw_clip"] = one_process("adamw_clip", standard=True)
        torch.save(references, out / f"reference.{kind}.pt")
    mesh = init_device_mesh("cpu", (world,))
    names = list(CASES) if mode == "train" else list(RESUMED)
    for name in names:
        case = CASES[name]
        ckpt = out / f"{name}.ckpt"
        if mode == "train":
            model, engine = prepare(case, mesh)

            def save_at(step, model=model, engine=engine, ckpt=ckpt, name=name):
                if name in RESUMED and step + 1 == SAVE_AT:
                    save_sharded(ckpt, engine, model=model)

            result = train(model, engine, case, range(STEPS), rank, world, on_step_end=save_at)
            tag = name
        else:
            # a different initialisation: everything must come from the checkpoint
            model, engine = prepare(case, mesh, seed=1)
            before = [_local(p).clone() for p in model.parameters()]
            engine.init_state()  # load_sharded does it too; here to check it leaves the weights alone
            assert all(torch.equal(b, _local(p)) for b, p in zip(before, model.parameters())), (
                "init_state moved"
            )
            assert all(p.grad is None for p in model.parameters())
            load_sharded(ckpt, engine, model=model)
            result = train(model, engine, case, range(SAVE_AT, STEPS), rank, world)
            tag = f"{name}.resumed"
        engine.detach()
        result["params"] = full_params(model)
        torch.save(result, out / f"{tag}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
