"""Names that transformers knows and no plugin provides: build them with transformers' own handler.

This keeps the promise that swapping ``Trainer`` for ``OptiTrainer`` never loses an optimizer.
"""

from __future__ import annotations

import importlib.metadata

from .plugin import DISTRIBUTED_MODES, BuildContext, Capabilities, OptimizerSpec


def transformers_optimizer_names() -> set[str]:
    from transformers.training_args import OptimizerNames

    return {m.value for m in OptimizerNames}


def _build_with_transformers(ctx: BuildContext):
    from transformers import Trainer
    from transformers.trainer_optimizer import is_optimizer_factory

    # transformers' handlers read the name from args.optim, which holds the requested name here
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(ctx.args, ctx.model)
    if is_optimizer_factory(optimizer_cls):
        return optimizer_cls()(ctx.model, **kwargs)
    groups = ctx.param_groups()
    # the same overrides Trainer.create_optimizer applies (GaLore groups, LOMO model, layerwise dict)
    for key in ("params", "model", "optimizer_dict"):
        if key in kwargs:
            groups = kwargs.pop(key)
    return optimizer_cls(groups, **kwargs)


def fallback_spec(name: str):
    """A spec deferring to transformers for ``name``, with its provenance; ``None`` if unknown there."""
    from .registry import Provenance

    if name not in transformers_optimizer_names():
        return None
    from .registry import KNOWN_PLUGINS, LAYERWISE_SUFFIX

    plugin = KNOWN_PLUGINS.get(name.removesuffix(LAYERWISE_SUFFIX))
    spec = OptimizerSpec(
        name=name,
        factory=_build_with_transformers,
        summary="built by transformers' own optimizer handler (no optitrainer plugin provides it)",
        transformers_name=name,
        # transformers decides what runs where (as with a plain Trainer); optitrainer vouches for nothing
        capabilities=Capabilities(distributed=DISTRIBUTED_MODES),
        docs=f"The plugin {plugin} provides optitrainer's own {name!r}: pip install {plugin}"
        if plugin
        else "",
    )
    return spec, Provenance("transformers", importlib.metadata.version("transformers"))
