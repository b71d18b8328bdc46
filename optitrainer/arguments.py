"""Training arguments that accept any registered optimizer name and typed ``optim_args``."""

from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .compat import CLIPPING_SCHEMES, check_arguments, learning_rate_warning
from .engine import deepspeed_launch_problem, deepspeed_missing
from .errors import EngineNotInstalledError, LaunchError
from .options import parse_optim_args
from .registry import REGISTRY, ResolvedOptimizer

logger = logging.getLogger("optitrainer")

#: accepted values of ``layerwise_clipping`` (``"auto"`` picks one of the engine's schemes)
LAYERWISE_CLIPPING = ("auto", *CLIPPING_SCHEMES)

#: the placeholder handed to transformers' own ``OptimizerNames`` check during ``__post_init__``
_ENUM_PLACEHOLDER = "adamw_torch"


@dataclass(frozen=True)
class OptimizerChoice:
    """The resolved optimizer and its parsed options, attached to training arguments."""

    resolved: ResolvedOptimizer
    #: typed options; ``None`` when transformers' own handler builds the optimizer (it parses them)
    options: dict[str, Any] | None


_CHOICES: dict[int, tuple[weakref.ref, tuple[str, str], OptimizerChoice]] = {}


def choose_optimizer(args: Any) -> OptimizerChoice:
    """Resolve ``args.optim`` and parse ``args.optim_args`` (cached on ``args``).

    Works for any ``TrainingArguments`` (plain ones too), so a user may keep their own arguments.
    Raises the errors of :mod:`optitrainer.errors` with the fix in the message.
    """
    requested = str(getattr(args.optim, "value", args.optim))
    key = (requested, repr(args.optim_args))
    cached = _CHOICES.get(id(args))
    if cached is not None and cached[0]() is args and cached[1] == key:
        return cached[2]
    resolved = REGISTRY.resolve(requested)
    if resolved.is_transformers_fallback:
        options = None
        if resolved.spec.docs:
            logger.warning(
                "optim=%r is built by transformers' own handler. %s", requested, resolved.spec.docs
            )
    else:
        options = parse_optim_args(resolved.spec, args.optim_args)
    choice = OptimizerChoice(resolved, options)
    check_arguments(choice.resolved, args, options=options)
    warning = learning_rate_warning(resolved, getattr(args, "learning_rate", None))
    if warning is not None:
        logger.warning("optitrainer: %s", warning)
    # kept beside the arguments, not on them: arguments get pickled into checkpoints
    args_id = id(args)
    _CHOICES[args_id] = (weakref.ref(args, lambda _: _CHOICES.pop(args_id, None)), key, choice)
    return choice


@dataclass
class OptiArgumentsMixin:
    """Mix into any ``TrainingArguments`` dataclass (e.g. TRL's ``SFTConfig``) to open ``optim=``.

    ``optim`` then accepts every registered name (``optitrainer list``), also from the command line
    through ``HfArgumentParser``; ``optim_args`` accepts transformers' string form or a dict. Bad
    values fail here, before any model is touched.
    """

    optim: str = field(
        default=TrainingArguments.default_optim,
        metadata={"help": "The optimizer: any name listed by `optitrainer list` (plugins add more)."},
    )
    optim_args: str | None = field(
        default=None,
        metadata={
            "help": "Options of the optimizer, as 'key=value, key2=value2' (or a dict in Python); "
            "`optitrainer info NAME` lists the accepted keys."
        },
    )

    # a list on the command line: `--optim_target_modules '.*attn.*' '.*mlp.*'` (transformers' str | list
    # field takes one value there); a str or a list in Python, as in transformers
    optim_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "The linear layers GaLore, APOLLO and other projecting optimizers act on: one or more "
            "patterns (a regex, or in a list: an exact name, a substring or a regex), or 'all-linear'."
        },
    )

    layerwise_clipping: str = field(
        default="auto",
        metadata={
            "help": "How `<name>_layerwise` clips exactly (max_grad_norm > 0): 'rebuild' (a norm pass, then "
            "weight gradients rebuilt from the recorded forward: no gradient outlives its norm), 'hold' (one "
            "backward keeping every gradient until the norm is known: one gradient copy of memory, no "
            "rebuild, and under DDP the gradients communicated once instead of twice), or 'auto' ('hold' "
            "under FSDP, whose gradients are sharded; 'rebuild' otherwise).",
            "choices": list(LAYERWISE_CLIPPING),
        },
    )

    def __post_init__(self) -> None:
        if self.layerwise_clipping not in LAYERWISE_CLIPPING:
            raise ValueError(
                f"layerwise_clipping={self.layerwise_clipping!r}: use one of {', '.join(LAYERWISE_CLIPPING)}"
            )
        if self.optim_target_modules == ["all-linear"]:  # `--optim_target_modules all-linear`
            self.optim_target_modules = "all-linear"
        missing = deepspeed_missing(getattr(self, "deepspeed", None))
        if missing is not None:
            raise EngineNotInstalledError(missing)
        problem = deepspeed_launch_problem(getattr(self, "deepspeed", None))
        if problem is not None:  # before transformers builds DeepSpeed's config (its first import builds ops)
            raise LaunchError(problem)
        requested = str(getattr(self.optim, "value", self.optim))
        self.optim = _ENUM_PLACEHOLDER  # transformers converts optim to its closed enum here
        super().__post_init__()
        self.optim = requested
        choice = choose_optimizer(self)
        self.optim = choice.resolved.name  # canonical: aliases resolved, "_layerwise" kept

    @property
    def optimizer_choice(self) -> OptimizerChoice:
        """The resolved optimizer (spec, mode, provenance) and its typed options."""
        return choose_optimizer(self)

    def __reduce_ex__(self, protocol: int):
        # a class made by with_optitrainer lives in no module a fresh process imports: pickle (the Trainer's
        # training_args.bin) refers to the argument class it was made from, and unpickling makes it again
        base = type(self).__dict__.get("_opti_base")
        if base is None:
            return super().__reduce_ex__(protocol)
        return (_rebuild_arguments, (base, dict(self.__dict__)))

    def set_optimizer(self, name: str = TrainingArguments.default_optim, **kwargs: Any):
        """Like ``TrainingArguments.set_optimizer`` but accepting any registered name."""
        super().set_optimizer(name=_ENUM_PLACEHOLDER, **kwargs)
        self.optim = name
        self.optim = choose_optimizer(self).resolved.name
        return self


@dataclass
class OptiTrainingArguments(OptiArgumentsMixin, TrainingArguments):
    """``TrainingArguments`` whose ``optim`` accepts every optimizer registered with optitrainer."""


def with_optitrainer(arguments_cls: type) -> type:
    """Return a subclass of a ``TrainingArguments`` dataclass with :class:`OptiArgumentsMixin` mixed in.

    >>> from trl import SFTConfig
    >>> OptiSFTConfig = with_optitrainer(SFTConfig)
    """
    if issubclass(arguments_cls, OptiArgumentsMixin):
        return arguments_cls
    made = _MADE.get(arguments_cls)
    if made is not None:
        return made
    name = f"Opti{arguments_cls.__name__}"
    cls = type(name, (OptiArgumentsMixin, arguments_cls), {"_opti_base": arguments_cls})
    cls.__module__ = __name__
    cls = dataclasses.dataclass(cls)
    _MADE[arguments_cls] = cls
    return cls


#: the classes with_optitrainer made, by the class they were made from (one each: isinstance stays true)
_MADE: dict[type, type] = {}


def _rebuild_arguments(base: type, state: dict[str, Any]) -> Any:
    """Unpickle arguments of a ``with_optitrainer(base)`` class (made again in a fresh process)."""
    cls = with_optitrainer(base)
    args = cls.__new__(cls)
    args.__dict__.update(state)
    return args
