"""The factory: upstream ``adam_mini.Adam_mini`` built from the model and the training arguments."""

from __future__ import annotations

from optitrainer.plugin import BuildContext

from .structure import ADAM_BLOCK_NAMES, ROW_NAMES, WQK_NAMES, Structure, read_structure


def structure_or_raise(ctx: BuildContext) -> Structure:
    structure, problems = read_structure(ctx.model, ctx.options)
    if structure is None:
        raise ValueError("; ".join(problems))
    return structure


def build(ctx: BuildContext):
    from adam_mini import Adam_mini

    structure = structure_or_raise(ctx)
    named = ctx.named_parameters()
    optimizer = Adam_mini(
        named,
        lr=ctx.lr,
        **ctx.adam_kwargs(),
        weight_decay=ctx.weight_decay,
        dim=structure.hidden_size,
        n_heads=structure.n_heads,
        n_kv_heads=structure.n_kv_heads,
        verbose=False,  # upstream prints one line per parameter; validate() reported the partition
    )
    # the partition checks of structure.py mirror these lists: fail loudly if an upstream update changed them
    expected = (ADAM_BLOCK_NAMES, WQK_NAMES, *ROW_NAMES.values())
    found = (
        optimizer.adam_block_names,
        optimizer.wqk_names,
        optimizer.embd_names,
        optimizer.output_names,
        optimizer.wv_names,
        optimizer.mlp_names,
        optimizer.attn_proj_names,
    )
    if tuple(map(frozenset, found)) != expected:
        raise RuntimeError("adam_mini's parameter-name lists changed; optitrainer-adam-mini needs an update")
    # upstream uses dim * dim // n_heads, which is one head only when head_dim * n_heads == dim (Llama);
    # models with an explicit head_dim (Qwen3, Gemma) would get blocks that straddle heads
    optimizer.head_numel = structure.head_numel
    # upstream sets world_size = torch.cuda.device_count() and, when > 1, all-gathers/all-reduces the
    # squared-gradient sums of the whole-tensor blocks: a crash in a single process on a multi-GPU
    # machine (no process group) and needless traffic under DDP, where every rank holds the whole
    # parameter and the same averaged gradient. 1 is the path upstream takes on CPU.
    optimizer.world_size = 1
    optimizer.check_block_name = False  # its report is print-only and validate() already checked
    # weight decay: the trainer's decision (transformers' rule: not biases, not norms, plus any override
    # of Trainer.get_decay_parameter_names) instead of upstream's substring rule ("norm", "ln", "bias")
    decay = ctx.decay_parameter_names()
    name_of = {id(p): n for n, p in named}
    for group in optimizer.param_groups:
        group["weight_decay"] = ctx.weight_decay if name_of[id(group["params"][0])] in decay else 0.0
    return optimizer
