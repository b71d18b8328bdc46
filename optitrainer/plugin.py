"""The plugin-author API: everything a distribution needs to add an ``optim=`` name.

A plugin is a module-level :class:`OptimizerSpec` referenced from an entry point in the group
``optitrainer.optimizers``::

    # pyproject.toml of the plugin distribution
    [project.entry-points."optitrainer.optimizers"]
    my_adam = "my_plugin:MY_ADAM"

    # my_plugin.py -- must import nothing heavy at module level: listing loads it.
    from optitrainer.plugin import Capabilities, OptimizerSpec, Option

    def _build(ctx):
        from my_upstream import MyAdam        # imported only when the optimizer is built
        return MyAdam(ctx.param_groups(), lr=ctx.lr, beta=ctx.options["beta"])

    MY_ADAM = OptimizerSpec(
        name="my_adam", factory=_build, summary="Adam with a twist",
        requires=("my-upstream>=1.0",), imports=("my_upstream",),
        options=(Option("beta", float, 0.9, "the twist"),),
    )

One entry point may also point to a list or tuple of specs (or a function returning one): a
distribution with many names then needs one line, ``my_plugin = "my_plugin:SPECS"``, and the entry
point's own name is free.

The built-in optimizers of the core use nothing but this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keep this module importable without torch: listing plugins must stay cheap
    import torch
    from torch import nn
    from transformers import TrainingArguments

    from .clipping import GradientRebuilder, activation_checkpointing, check_rebuilt

__all__ = [
    "PLUGIN_API_VERSION",
    "GradientRebuilder",
    "activation_checkpointing",
    "check_rebuilt",
    "BackwardContext",
    "BuildContext",
    "Capabilities",
    "Option",
    "OptimizerSpec",
    "DISTRIBUTED_MODES",
    "ENGINE_MODES",
    "needs_torch",
]

#: The version of this API, ``(major, minor)``: a minor release only adds (a plugin written for 1.0 keeps
#: working); a major one may remove what a minor release deprecated with a warning. 1.0: optitrainer 0.1.0.
#: 1.1: :func:`needs_torch`, :attr:`BackwardContext.averager`. 1.2: :attr:`OptimizerSpec.learning_rate_range`
#: (CHANGELOG.md lists every change).
PLUGIN_API_VERSION = (1, 2)

#: Exact clipping for plugins that update inside backward (see :mod:`optitrainer.clipping`): public here,
#: imported on first use so that this module stays importable without torch.
_CLIPPING = ("GradientRebuilder", "activation_checkpointing", "check_rebuilt")


def __getattr__(name: str) -> Any:
    if name in _CLIPPING:
        from . import clipping

        return getattr(clipping, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Every distributed engine the trainer tells apart (see :class:`optitrainer.engine.Engine`):
#: DDP, DeepSpeed ZeRO stages 0-3, FSDP versions 1 and 2.
ENGINE_MODES = ("ddp", "zero0", "zero1", "zero2", "zero3", "fsdp1", "fsdp2")
#: Umbrella names also accepted in :attr:`Capabilities.distributed` (a plugin written before the
#: engines were told apart says ``"deepspeed"`` for every ZeRO stage and ``"fsdp"`` for both versions).
DISTRIBUTED_MODES = frozenset({"ddp", "fsdp", "deepspeed"})
_UMBRELLAS = {"deepspeed": ("zero0", "zero1", "zero2", "zero3"), "fsdp": ("fsdp1", "fsdp2")}


def expand_engines(modes: frozenset[str] | set[str] | tuple[str, ...]) -> frozenset[str]:
    """Engine keys of :data:`ENGINE_MODES` that ``modes`` (which may use the umbrella names) cover."""
    out: set[str] = set()
    for mode in modes:
        out.update(_UMBRELLAS.get(mode, (mode,)))
    return frozenset(out)


@dataclass(frozen=True)
class Option:
    """One typed key of ``optim_args``.

    ``type`` is ``bool``, ``int``, ``float``, ``str`` or ``tuple`` (written ``betas=(0.9,0.99)`` or
    ``betas=0.9:0.99`` in the string form; its items are ``element``, float by default, and there are
    ``length`` of them when given, else as many as in ``default``). ``default=None`` makes the option
    optional (``none`` in the string form); ``nullable=True`` also accepts ``None`` when the default is
    not ``None``. ``choices`` restricts the accepted values; ``low``/``high`` bound numbers, inclusive
    unless ``low_exclusive``/``high_exclusive``. Floats must be finite.
    """

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    nullable: bool = False
    low_exclusive: bool = False
    high_exclusive: bool = False
    length: int | None = None
    element: type = float

    def __post_init__(self) -> None:
        if self.type is tuple and self.element not in (float, int):
            raise ValueError(f"option {self.name!r}: tuple elements must be float or int, not {self.element}")

    @property
    def accepts_none(self) -> bool:
        return self.default is None or self.nullable

    @property
    def tuple_length(self) -> int | None:
        """How many items a tuple option takes (``length``, else ``len(default)``), ``None`` for any."""
        if self.length is not None:
            return self.length
        return len(self.default) if isinstance(self.default, (tuple, list)) else None

    def describe_type(self) -> str:
        # "float ..., finite", as the first commits began it ("float in [0, inf"); an option's error puts
        # 0.1.0's "finite float in [0, inf)" before it (options._as_0_1_0_said_it): plugin tests match both
        text = self.type.__name__
        if self.type is tuple:
            n = self.tuple_length
            text = f"tuple of {n if n is not None else 'any number of'} {self.element.__name__}"
        if self.choices:
            text = " | ".join(repr(c) for c in self.choices)
        if self.accepts_none:
            text += " | None"
        if self.low is not None or self.high is not None:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            left = "(" if self.low_exclusive or self.low is None else "["
            right = ")" if self.high_exclusive or self.high is None else "]"
            text += f" in {left}{lo}, {hi}{right}"
        if self.type is float and not self.choices:
            text += ", finite"
        return text


@dataclass(frozen=True)
class Capabilities:
    """What an optimizer can do; the trainer's one compatibility check reads every flag.

    Attributes:
        layerwise: may run as one optimizer per parameter, stepped from a gradient hook
            (``<name>_layerwise``).
        owns_backward: the plugin runs the backward pass itself (fused backward + update, e.g. LOMO);
            the spec must then provide ``backward``.
        needs_target_modules: ``optim_target_modules`` must be set (GaLore, APOLLO).
        train_eval_modes: the optimizer has ``train()``/``eval()`` that change the model's weights
            (schedule-free); the trainer switches them around evaluation and weight saving, and reads
            the current mode from ``param_groups[0]["train_mode"]`` (the ``schedulefree`` convention).
        gradient_accumulation: gradient accumulation > 1 gives correct updates. Left unset: claimed,
            except by ``owns_backward`` plugins (the trainer accumulates before ``step()``).
        gradient_clipping: ``max_grad_norm > 0`` is honoured truthfully.
        fp16: works with ``fp16=True`` loss scaling. Left unset: claimed, except by ``owns_backward``
            plugins (the trainer unscales the gradients before ``step()``).
        distributed: the distributed engines it trains correctly under: keys of :data:`ENGINE_MODES`
            (``"ddp"``, ``"zero1"``…, ``"fsdp2"``) or the umbrellas ``"deepspeed"`` (every ZeRO stage) and
            ``"fsdp"`` (both versions). Left unset, it claims DDP only (every rank holds whole parameters
            and the averaged gradient, so any optimizer whose ``step()`` is deterministic is right
            there), and nothing for a fused-backward plugin (its hooks must average the gradients).
            Claim ZeRO or FSDP only for optimizers that are right on flattened, sharded tensors
            (elementwise updates), and test it. The ``_layerwise`` form runs under the engines of this
            set that the layerwise engine supports (DDP, FSDP2); a fused-backward plugin
            (``owns_backward``) must average gradients with :attr:`BackwardContext.average_gradient`.
        distributed_note: why the other engines are not supported, shown with the refusal
            (e.g. "needs whole 2-D weights; ZeRO flattens and FSDP shards them").
        requires_cuda: only runs on a CUDA device.
        changes_trainable: the optimizer changes which parameters require gradients while training
            (block-coordinate descent). DDP's reducer only averages the parameters that required
            gradients when it wrapped the model, so under DDP the trainer keeps the model unwrapped
            (rank 0's weights broadcast, as DDP does) and averages every gradient itself after the last
            micro-batch, before clipping and ``step()``.
    """

    layerwise: bool = False
    owns_backward: bool = False
    needs_target_modules: bool = False
    train_eval_modes: bool = False
    gradient_accumulation: bool | None = None
    gradient_clipping: bool = True
    fp16: bool | None = None
    distributed: frozenset[str] | None = None
    distributed_note: str = ""
    requires_cuda: bool = False
    changes_trainable: bool = False

    def __post_init__(self) -> None:
        # the trainer makes accumulation and loss scaling transparent to an optimizer's step(); a
        # fused-backward plugin updates inside backward, so it claims them only by declaring them
        for flag in ("gradient_accumulation", "fp16"):
            if getattr(self, flag) is None:
                object.__setattr__(self, flag, not self.owns_backward)
        if self.distributed is None:
            return
        modes = frozenset(self.distributed)
        unknown = sorted(modes - set(ENGINE_MODES) - DISTRIBUTED_MODES)
        if unknown:
            raise ValueError(
                f"Capabilities(distributed=...) got unknown engine(s) {unknown}; use any of "
                f"{list(ENGINE_MODES)} or the umbrellas 'deepspeed', 'fsdp'"
            )
        object.__setattr__(self, "distributed", modes)

    @property
    def engines(self) -> frozenset[str]:
        """The engine keys (:data:`ENGINE_MODES`) :attr:`distributed` covers."""
        if self.distributed is None:
            return frozenset() if self.owns_backward else frozenset({"ddp"})
        return expand_engines(self.distributed)

    def flags(self) -> list[str]:
        """Short human-readable flags, for listings."""
        out = []
        if self.layerwise:
            out.append("layerwise")
        if self.owns_backward:
            out.append("fused-backward")
        if self.needs_target_modules:
            out.append("target-modules")
        if self.train_eval_modes:
            out.append("train/eval")
        if self.requires_cuda:
            out.append("cuda-only")
        if self.changes_trainable:
            out.append("changes-trainable")
        if not self.gradient_accumulation:
            out.append("no-grad-accum")
        out.append("dist:" + (",".join(m for m in ENGINE_MODES if m in self.engines) or "none"))
        return out


@dataclass
class BuildContext:
    """Everything a factory may read to build its optimizer.

    Attributes:
        model: the model being trained (unwrapped).
        args: the training arguments.
        options: the parsed, typed ``optim_args`` (every declared option present, defaults filled).
        name: the canonical optimizer name being built (without ``_layerwise``).
        layerwise: whether the optimizer will run per parameter.
        parameters: an explicit list of ``(name, parameter)`` to optimize; ``None`` means every
            trainable parameter of ``model``.
        decay_names: parameter names that get weight decay, as the trainer decided
            (``Trainer.get_decay_parameter_names``); ``None`` applies transformers' rule.
    """

    model: nn.Module
    args: TrainingArguments
    options: dict[str, Any]
    name: str
    layerwise: bool = False
    parameters: list[tuple[str, nn.Parameter]] | None = None
    decay_names: set[str] | None = None

    @property
    def lr(self) -> float:
        return self.args.learning_rate

    @property
    def weight_decay(self) -> float:
        return self.args.weight_decay

    def adam_kwargs(self) -> dict[str, Any]:
        """``betas`` and ``eps`` from the training arguments."""
        return {"betas": (self.args.adam_beta1, self.args.adam_beta2), "eps": self.args.adam_epsilon}

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters to optimize, by name."""
        if self.parameters is not None:
            return list(self.parameters)
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def decay_parameter_names(self) -> set[str]:
        """Names of parameters that get weight decay (the trainer's rule: not biases, not norms)."""
        if self.decay_names is not None:
            return set(self.decay_names)
        from torch import nn
        from transformers.trainer_pt_utils import get_parameter_names

        forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
        return set(get_parameter_names(self.model, [nn.LayerNorm], forbidden))

    def param_groups(self, extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Two groups as ``transformers.Trainer`` builds them: decayed, then not decayed.

        ``extra`` is merged into both groups. Empty groups are kept so that group indices (and thus
        checkpoints) do not depend on the model.
        """
        decay = self.decay_parameter_names()
        named = self.named_parameters()
        extra = dict(extra or {})
        return [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.weight_decay, **extra},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0, **extra},
        ]

    def target_linear_parameters(self) -> tuple[list[tuple[str, nn.Parameter]], list[str]]:
        """Weights of the ``nn.Linear`` modules selected by ``optim_target_modules``.

        Returns ``(selected, ignored)`` where ``ignored`` lists modules matched by name that are not
        ``nn.Linear`` (their parameters are optimized normally). Accepts a list of exact names,
        suffixes or regexes, a single regex string, or ``"all-linear"``.
        """
        return select_target_linears(self.model, self.args.optim_target_modules, self.named_parameters())


@dataclass
class BackwardContext:
    """What a plugin that owns the backward pass (``Capabilities.owns_backward``) receives."""

    optimizer: torch.optim.Optimizer
    loss: torch.Tensor
    lr: float
    max_grad_norm: float
    model: nn.Module
    accelerator: Any
    #: ``average_gradient(grad)`` averages a gradient across the data-parallel ranks in place (a no-op on
    #: one process, and where the engine already reduced it); call it before using a gradient
    average_gradient: Callable[[torch.Tensor], None] = field(default=lambda grad: None)
    #: the same averaging in buckets overlapped with backward, as DDP's reducer does (``None`` where no
    #: averaging is needed): ``averager.add(grad, on_ready)`` takes a gradient the plugin no longer needs
    #: and later calls ``on_ready(average)``, in the order of the ``add`` calls (``average`` may be a view
    #: into a reused bucket: copy what you keep); ``averager.flush()`` when your backward returns delivers
    #: the rest. Preferred to ``average_gradient``, which blocks on one collective per gradient.
    averager: Any = None


@dataclass(frozen=True)
class OptimizerSpec:
    """The declarative description of one ``optim=`` name.

    Attributes:
        name: the canonical name users write in ``optim=``.
        factory: ``factory(ctx: BuildContext) -> torch.optim.Optimizer``.
        summary: one line for ``optitrainer list``.
        requires: pip requirements of the upstream package (shown in install hints).
        imports: importable module names that must be present (checked without importing them).
        options: the ``optim_args`` keys it accepts.
        aliases: other accepted names.
        capabilities: see :class:`Capabilities`.
        transformers_name: the name ``transformers.Trainer`` knows for the same optimizer, if any.
        validate: ``validate(ctx) -> list[str]``: extra problems found before training
            (e.g. target modules matching nothing); each is reported with the others.
        backward: ``backward(bctx: BackwardContext) -> float | None`` for ``owns_backward``
            plugins; returns the measured pre-clip gradient norm, or ``None`` when none was measured.
        callbacks: ``callbacks(optimizer) -> list[TrainerCallback]`` added to the trainer once the
            optimizer is built (e.g. to feed it training/evaluation losses).
        log_values: ``log_values(optimizer) -> dict[str, float]`` merged into every training log
            (e.g. the learning rate an optimizer really applied). ``optimizer`` is what ``factory``
            built; in layerwise mode, the first parameter's optimizer.
        docs: a longer description (markdown) for ``optitrainer info``.
        recommended_lr: the learning rate the method is meant to run at (e.g. 1.0 for Prodigy and
            D-Adaptation). The conformance kit trains at it, ``optitrainer info`` shows it, and (without
            ``learning_rate_range``) the trainer warns when ``learning_rate`` is 100 times away from it.
        learning_rate_range: ``(low, high)``, the learning rates at which the method learned in the
            kit's run, measured with ``optitrainer check NAME --measure-lr``; the trainer warns outside
            it, and the kit's ``learns`` check trains at both ends. Declare it for methods whose rate is a
            dimensionless multiplier (Prodigy, D-Adaptation), where a tiny model's range carries over.
        validate_arguments: ``validate_arguments(args, options) -> list[str]``: problems that need no
            model (e.g. a learning rate that makes the method a no-op), found when the training
            arguments are built and reported with the other conflicts.
    """

    name: str
    factory: Callable[[BuildContext], torch.optim.Optimizer]
    summary: str
    requires: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    aliases: tuple[str, ...] = ()
    capabilities: Capabilities = field(default_factory=Capabilities)
    transformers_name: str | None = None
    validate: Callable[[BuildContext], list[str]] | None = None
    backward: Callable[[BackwardContext], float | None] | None = None
    callbacks: Callable[[torch.optim.Optimizer], list[Any]] | None = None
    log_values: Callable[[torch.optim.Optimizer], dict[str, float]] | None = None
    docs: str = ""
    recommended_lr: float | None = None
    validate_arguments: Callable[[TrainingArguments, dict[str, Any]], list[str]] | None = None
    learning_rate_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"optimizer name {self.name!r} must be lower_snake_case")
        if self.capabilities.owns_backward and self.backward is None:
            raise ValueError(f"{self.name!r} declares owns_backward but gives no backward function")
        if self.learning_rate_range is not None:
            low, high = self.learning_rate_range
            if not 0 < low <= high:
                raise ValueError(f"{self.name!r}: learning_rate_range=({low}, {high}) needs 0 < low <= high")
            if self.recommended_lr is not None and not low <= self.recommended_lr <= high:
                raise ValueError(
                    f"{self.name!r}: recommended_lr={self.recommended_lr} lies outside "
                    f"learning_rate_range=({low}, {high})"
                )
        if self.recommended_lr is not None and not (
            isinstance(self.recommended_lr, (int, float)) and 0 < self.recommended_lr < float("inf")
        ):
            raise ValueError(
                f"{self.name!r}: recommended_lr must be a positive number, got {self.recommended_lr!r}"
            )
        seen = set()
        for opt in self.options:
            if opt.name in seen:
                raise ValueError(f"{self.name!r}: option {opt.name!r} declared twice")
            seen.add(opt.name)

    @property
    def option_map(self) -> dict[str, Option]:
        return {o.name: o for o in self.options}

    def pip_command(self) -> str:
        return "pip install " + " ".join(
            f"'{r}'" if any(c in r for c in "<>=!~") else r for r in self.requires
        )


def needs_torch(release: str, what: str, who: str) -> list[str]:
    """``[]`` when the installed torch is ``release`` or newer, else the refusal naming ``what`` and the fix.

    For a spec's ``validate_arguments``, so that a feature of a newer torch is refused when the arguments
    are built: ``validate_arguments=lambda args, options: needs_torch("2.9", "torch.optim.Muon", "muon")``.
    """
    import torch
    from packaging.version import Version

    if Version(Version(torch.__version__).public) >= Version(release):
        return []
    return [
        f"{who} needs {what}, which torch {torch.__version__} lacks (added in torch {release}); "
        f"pip install 'torch>={release}' (the build for your CUDA, or the CPU build), or pick another optimizer"
    ]


def select_target_linears(
    model: nn.Module,
    patterns: str | Sequence[str] | None,
    named_parameters: Sequence[tuple[str, nn.Parameter]] | None = None,
) -> tuple[list[tuple[str, nn.Parameter]], list[str]]:
    """See :meth:`BuildContext.target_linear_parameters`."""
    from torch import nn

    if patterns is None:
        return [], []
    all_linear = isinstance(patterns, str) and patterns.replace("_", "-") == "all-linear"

    def matches(module_name: str) -> bool:
        # transformers' rule (trainer_utils.check_target_module_exists), so both select the same
        # weights: a string is a regex; a list entry is an exact name, a substring or a regex.
        if all_linear:
            return True
        if isinstance(patterns, str):
            return _fullmatch(patterns, module_name)
        return any(
            pat == module_name or pat in module_name or _fullmatch(pat, module_name) for pat in patterns
        )

    trainable = dict(named_parameters) if named_parameters is not None else None
    selected, ignored = [], []
    for module_name, module in model.named_modules():
        if not module_name or not matches(module_name):
            continue
        if isinstance(module, nn.Linear):
            pname = f"{module_name}.weight"
            if trainable is None or pname in trainable:
                selected.append((pname, module.weight))
        elif (
            not all_linear
            and not any(True for _ in module.children())
            and any(True for _ in module.parameters(recurse=False))
        ):
            # a matched leaf with weights that is not Linear: it stays on the plain path, say so
            ignored.append(f"{module_name} ({type(module).__name__})")
    return selected, ignored


def _fullmatch(pattern: str, text: str) -> bool:
    try:
        return re.fullmatch(pattern, text) is not None
    except re.error:
        return False
