"""optitrainer plugin: ``optim="badam"`` (BAdam, https://github.com/Ledzy/BAdam, ``badam==1.4``).

Block-coordinate descent: AdamW updates one block of parameters (by default one decoder layer) while
the others are frozen, and the block changes every ``switch_block_every`` steps. Optimizer state and
gradients exist for the active block only.

Nothing heavy is imported here (``optitrainer list`` imports this module): the optimizer
(:mod:`optitrainer_badam.optimizer`, which imports torch and ``badam``) is imported in the factory.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from optitrainer.plugin import BuildContext, Capabilities, OptimizerSpec, Option

if TYPE_CHECKING:
    from .optimizer import BlockOptimizer

__all__ = ["BADAM", "BlockOptimizer", "parse_blocks", "parse_prefixes"]

__version__ = "0.1.0"

SWITCH_MODES = ("ascending", "descending", "random", "fixed")


def __getattr__(name: str) -> Any:  # lazy: `from optitrainer_badam import BlockOptimizer`
    if name == "BlockOptimizer":
        from .optimizer import BlockOptimizer

        return BlockOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_prefixes(text: str | None) -> list[str]:
    """``"a|b"`` -> ``["a", "b"]`` (``None`` or empty: ``[]``)."""
    return [p.strip() for p in (text or "").split("|") if p.strip()]


def parse_blocks(text: str | None) -> list[list[str]] | None:
    """``"model.layers.0.;model.layers.1.|lm_head"`` -> ``[["model.layers.0."], ["model.layers.1.", "lm_head"]]``.

    Blocks are separated by ``;``, the name substrings of one block by ``|``; ``None``: infer the blocks.
    """
    if text is None or not text.strip():
        return None
    return [parse_prefixes(block) for block in text.split(";") if parse_prefixes(block)]


def _blocks(ctx: BuildContext) -> list[list[str]]:
    from .optimizer import infer_blocks

    o = ctx.options
    given = parse_blocks(o["block_prefixes"])
    if given is not None:
        return given
    names = [n for n, _ in ctx.named_parameters()]
    return infer_blocks(names, o["include_embedding"], o["include_lm_head"])


def _build(ctx: BuildContext):
    import torch

    from .optimizer import BlockOptimizer

    o = ctx.options
    # the base optimizer is adamw_torch's: lr, betas, eps and the per-group weight decay (not on
    # biases and norms) from the training arguments
    base = torch.optim.AdamW(ctx.param_groups(), lr=ctx.lr, **ctx.adam_kwargs())
    return BlockOptimizer(
        base,
        ctx.named_parameters(),
        block_prefix_list=_blocks(ctx),
        switch_block_every=o["switch_block_every"],
        start_block=o["start_block"],
        switch_mode=o["switch_mode"],
        active_modules=parse_prefixes(o["active_modules"]),
        seed=ctx.args.seed if o["seed"] is None else o["seed"],
    )


def _argument_problems(args: Any, options: dict[str, Any]) -> list[str]:
    problems = []
    if options.get("switch_mode") == "fixed" and options.get("start_block") is None:
        problems.append(
            "optim_args: switch_mode='fixed' trains one block only; give it, e.g. 'start_block=0'"
        )
    given = parse_blocks(options.get("block_prefixes"))
    flags = [k for k in ("include_embedding", "include_lm_head") if options.get(k)]
    if given is not None and flags:
        # upstream ignores them silently when the blocks are given
        problems.append(
            f"optim_args: {' and '.join(flags)} only shape the automatic blocks, and block_prefixes gives "
            "the blocks: add the embedding's or the head's name to block_prefixes instead (e.g. "
            "'block_prefixes=layers.0.;layers.1.;embed_tokens|lm_head|model.norm')"
        )
    return problems


def _validate(ctx: BuildContext) -> list[str]:
    from .optimizer import block_problems

    problems = _argument_problems(ctx.args, ctx.options)
    return problems + block_problems(ctx.named_parameters(), _blocks(ctx), ctx.options["start_block"])


def _callbacks(optimizer) -> list:
    from .callback import TrainableBlockCallback

    return [TrainableBlockCallback(optimizer)]


def _log_values(optimizer) -> dict[str, float]:
    # the block the logged step trained (the active one may already be the next)
    block = getattr(optimizer, "last_block", None)
    return {} if block is None else {"badam_block": float(block)}


_OPTIONS = (
    Option(
        "switch_block_every",
        int,
        50,
        "optimizer steps per block (upstream's schedule: the first block gets one step less)",
        low=1,
    ),
    Option("switch_mode", str, "ascending", "order of the blocks", choices=SWITCH_MODES),
    Option("start_block", int, None, "index of the first block (None: first of the order)", low=0),
    Option(
        "block_prefixes",
        str,
        None,
        "blocks as name substrings: ';' between blocks, '|' within one (None: one block per decoder layer)",
    ),
    Option("active_modules", str, None, "name substrings trained with every block, '|'-separated"),
    Option("include_embedding", bool, False, "automatic blocks: the embedding is a block too"),
    Option("include_lm_head", bool, False, "automatic blocks: the head and the other parameters are a block"),
    Option("seed", int, None, "seed of the random block order (None: the training arguments' seed)"),
)


def _capabilities() -> Capabilities:
    fields = {f.name for f in dataclasses.fields(Capabilities)}
    # an optitrainer that can average gradients for a changing trainable set runs DDP; older ones cannot
    ddp = "changes_trainable" in fields
    return Capabilities(
        layerwise=False,
        # untested here (CPU only); a loss-scaler skip would still leave the schedule right
        fp16=False,
        distributed=frozenset({"ddp"} if ddp else ()),
        distributed_note=(
            "DeepSpeed and FSDP partition the optimizer and the gradients over a fixed set of trainable "
            "parameters; BAdam changes that set every switch_block_every steps"
            + ("" if ddp else "; DDP needs optitrainer's changes_trainable support (upgrade optitrainer)")
        ),
        **({"changes_trainable": True} if ddp else {}),
    )


_SPEC_KWARGS: dict[str, Any] = {}
if "validate_arguments" in {f.name for f in dataclasses.fields(OptimizerSpec)}:
    _SPEC_KWARGS["validate_arguments"] = _argument_problems

BADAM = OptimizerSpec(
    name="badam",
    factory=_build,
    summary="BAdam: AdamW on one block of layers at a time, switching blocks every K steps (badam==1.4)",
    requires=("badam==1.4",),
    imports=("badam",),
    options=_OPTIONS,
    capabilities=_capabilities(),
    validate=_validate,
    callbacks=_callbacks,
    log_values=_log_values,
    docs=(
        "Block-coordinate descent (BAdam, arXiv:2404.02827, as in LLaMA-Factory's `use_badam`): AdamW "
        "updates one block of parameters (by default one decoder layer, `model.layers.<i>.`) while the "
        "others are frozen (`requires_grad=False`: no gradient, no optimizer state), and the active block "
        "changes after `switch_block_every` optimizer steps (the first block gets one step less, as "
        "upstream), its AdamW moments starting from zero. The active block, the step count and the random "
        "order (drawn from its own seeded generator) are in the optimizer's state_dict, so a resumed run "
        "equals an uninterrupted one. lr/betas/eps/weight_decay come from the training arguments; biases "
        "and norms get no weight decay (upstream decays norms). Under DDP the trainer averages the active "
        "block's gradients itself (DDP's reducer only knows the parameters trainable when it wrapped the "
        "model); DeepSpeed and FSDP are refused."
    ),
    **_SPEC_KWARGS,
)
