"""optitrainer plugin: ``optim="adam_mini"`` (Adam-mini, https://github.com/zyushun/Adam-mini).

Nothing heavy is imported here (``optitrainer list`` imports this module): the factory
(:mod:`optitrainer_adam_mini.build`, which imports torch and ``adam_mini``) is imported when the
optimizer is built.
"""

from __future__ import annotations

import logging

from optitrainer.plugin import BuildContext, Capabilities, OptimizerSpec, Option

__all__ = ["ADAM_MINI"]

__version__ = "0.1.0"

logger = logging.getLogger(__name__)


def _build(ctx: BuildContext):
    from .build import build

    return build(ctx)


def _validate(ctx: BuildContext) -> list[str]:
    """The structure can be read and every parameter fits the partition Adam-mini will give it."""
    from .structure import partition_problems, read_structure, single_rate_matrices

    structure, problems = read_structure(ctx.model, ctx.options)
    if structure is None:
        return problems
    shapes = [(n, tuple(p.shape)) for n, p in ctx.named_parameters()]
    single = single_rate_matrices(shapes)
    if single:  # upstream's choice for names it does not know; legal, but say so once
        logger.warning(
            "Adam-mini gives one learning rate to the whole of %s (no name in its lists matched)",
            ", ".join(single),
        )
    return partition_problems(structure, shapes)


_STRUCTURE_HELP = "; None (default): read from the model's config ({})"

ADAM_MINI = OptimizerSpec(
    name="adam_mini",
    factory=_build,
    summary="Adam-mini: Adam with one second-moment value per head/neuron/tensor (about half AdamW's state)",
    requires=("adam-mini==1.1.1",),
    imports=("adam_mini",),
    options=(
        Option("dim", int, None, "hidden size" + _STRUCTURE_HELP.format("hidden_size"), low=1),
        Option(
            "n_heads", int, None, "attention heads" + _STRUCTURE_HELP.format("num_attention_heads"), low=1
        ),
        Option(
            "n_kv_heads",
            int,
            None,
            "key/value heads (grouped-query attention)"
            + _STRUCTURE_HELP.format("num_key_value_heads, else n_heads"),
            low=1,
        ),
        Option(
            "head_dim",
            int,
            None,
            "size of one attention head" + _STRUCTURE_HELP.format("head_dim, else dim // n_heads"),
            low=1,
        ),
    ),
    capabilities=Capabilities(
        # every parameter is its own param group with its own state and nothing crosses parameters
        # (upstream's cross-rank reduction is switched off, see build.py): the kit proves layerwise exact
        layerwise=True,
        distributed=frozenset({"ddp"}),
        distributed_note=(
            "its blocks are whole heads and whole rows of each weight, found by parameter name; ZeRO "
            "flattens and slices parameters across ranks and FSDP shards them, which breaks both (upstream's "
            "sharded path is CUDA/NCCL-only and unverified here)"
        ),
    ),
    validate=_validate,
    docs=(
        "Adam-mini (Zhang et al., 2024, arXiv:2406.16793) keeps Adam's first moment but replaces the "
        "per-element second moment by one mean per block: per attention head for query/key weights, per "
        "row for embeddings, the output head, value, attention-output and MLP weights, per tensor for "
        "norms; biases keep plain Adam. The optimizer state is about half of AdamW's. The blocks are found "
        "by parameter name and the head size from the model's config (hidden_size, num_attention_heads, "
        "num_key_value_heads, head_dim), so `optim='adam_mini'` needs nothing else on Llama-style models. "
        "From the training arguments: learning_rate, adam_beta1/adam_beta2/adam_epsilon and weight_decay "
        "(not on biases and norms, as transformers decides)."
    ),
)
