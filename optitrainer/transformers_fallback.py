"""Names that transformers knows and no plugin provides: build them with transformers' own handler.

This keeps the promise that swapping ``Trainer`` for ``OptiTrainer`` never loses an optimizer.
"""

from __future__ import annotations

import importlib.metadata

from .plugin import DISTRIBUTED_MODES, BuildContext, Capabilities, OptimizerSpec


def transformers_optimizer_names() -> set[str]:
    from transformers.training_args import OptimizerNames

    return {m.value for m in OptimizerNames}


class _TrainerStandIn:
    """What transformers' ``Trainer.create_optimizer`` reads from ``self``, taken from the build context.

    Running that method itself (not a copy of it) keeps every special case it has identical: the
    bitsandbytes 8-bit embedding overrides, GaLore/APOLLO groups, LOMO, layerwise dicts, factories.
    """

    optimizer = None
    optimizer_cls_and_kwargs = None

    def __init__(self, ctx: BuildContext) -> None:
        from transformers import Trainer

        self.model, self.args, self._ctx = ctx.model, ctx.args, ctx
        self.get_optimizer_cls_and_kwargs = Trainer.get_optimizer_cls_and_kwargs

    def get_decay_parameter_names(self, model) -> set[str]:
        return self._ctx.decay_parameter_names()  # the trainer's decision, passed in the context

    def __getattr__(self, name: str):
        import transformers

        raise AttributeError(
            f"transformers {transformers.__version__}'s Trainer.create_optimizer reads self.{name}, which "
            "optitrainer's fallback does not provide; please report it to optitrainer"
        )


def _build_with_transformers(ctx: BuildContext):
    from transformers import Trainer

    if ctx.parameters is not None:
        raise ValueError(f"optim={ctx.name!r}: transformers builds its optimizers for the whole model")
    # transformers' handlers read the name from args.optim, which holds the requested name here (a str
    # on OptiTrainingArguments: the handler table's keys are str enums, so the lookup is the same)
    return Trainer.create_optimizer(_TrainerStandIn(ctx), ctx.model)


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
