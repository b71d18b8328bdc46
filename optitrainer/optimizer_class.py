"""``get_optimizer_cls_and_kwargs`` for every plugin name: what a script or framework builds itself.

transformers answers ``(optimizer class, keyword arguments)``: ``cls(groups, **kwargs)`` builds the
optimizer for the Trainer's two parameter groups (decayed, not decayed), and a ``"params"`` key, when
present, replaces those groups. For optimizers that need the whole model (its Muon) it answers a factory
instead: ``cls()(model, **kwargs)``. A plugin builds its optimizer with a factory function, so the class
and keyword arguments are read off an optimizer the plugin builds (and that is then dropped), and proven
by building ``cls(groups, **kwargs)`` once more and comparing the two. Where they differ (the plugin
registers hooks or sets attributes after construction, or needs arguments ``defaults`` does not hold),
the answer is transformers' factory form, which runs the plugin's own build. Optimizers that need
OptiTrainer's training step (layerwise mode, fused backward) are refused with the reason.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from .arguments import OptimizerChoice, choose_optimizer
from .errors import IncompatibleConfigError
from .plugin import BuildContext

logger = logging.getLogger("optitrainer")


class PluginOptimizerFactory:
    """transformers' factory form: ``PluginOptimizerFactory()(model, training_args=args)``.

    Builds ``args.optim`` with its plugin's own factory, exactly as ``OptiTrainer.create_optimizer``
    does on one process (the plugin's defaults and ``optim_args`` included).
    """

    def __call__(self, model: nn.Module, training_args: Any) -> torch.optim.Optimizer:
        choice = choose_optimizer(training_args)
        return choice.resolved.spec.factory(_context(choice, training_args, model))


class _ProbeModel(nn.Module):
    """Stands in for the model when none is given: decayed weights, and an undecayed bias and norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


def optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Any, dict[str, Any]]:
    """``(class, kwargs)`` that build ``args.optim`` as its plugin does, or transformers' factory form.

    Raises :class:`~optitrainer.IncompatibleConfigError` for optimizers only OptiTrainer's training
    step can run (layerwise mode, fused backward), naming why.
    """
    choice = choose_optimizer(args)
    resolved = choice.resolved
    if resolved.is_transformers_fallback:
        from transformers import Trainer

        return Trainer.get_optimizer_cls_and_kwargs(args, model)
    caps = resolved.spec.capabilities
    if resolved.layerwise or caps.owns_backward:
        how = (
            "runs one optimizer per parameter, stepped from gradient hooks during backward"
            if resolved.layerwise
            else "updates the weights inside its own backward pass"
        )
        raise IncompatibleConfigError(
            f"optim={resolved.name!r} cannot be built from a class and keyword arguments: it {how}, which "
            "only OptiTrainer's training step runs. Train with optitrainer.OptiTrainer (or mix "
            "optitrainer.OptiTrainerMixin into your Trainer subclass)."
        )
    if model is None and caps.needs_target_modules:
        return _factory_form(args, resolved.name, "without the model its target modules are unknown")
    target = model if model is not None else _ProbeModel()
    try:
        built = resolved.spec.factory(_context(choice, args, target))
    except ImportError:
        # the optimizer's package (or a module of it) cannot be imported: that is not a matter of the
        # missing model, and transformers raises it here too (its test_bnb_not_available)
        raise
    except Exception as exc:
        if model is not None:
            raise
        return _factory_form(
            args, resolved.name, f"it cannot be built without the model ({type(exc).__name__}: {exc})"
        )
    _warn_about_callbacks(choice, built)
    cls = type(built)
    kwargs = _constructor_kwargs(cls, built.defaults)
    # the two groups transformers' Trainer.create_optimizer hands the class (BuildContext builds the same)
    trainer_groups = _context(choice, args, target).param_groups()
    problem = _rebuild_problem(built, cls, trainer_groups, kwargs)
    if problem is None:
        return cls, kwargs
    if model is not None:  # the plugin groups the parameters itself: hand its groups over
        own = _groups_without_defaults(built)
        if _rebuild_problem(built, cls, own, kwargs) is None:
            return cls, {**kwargs, "params": own}
    return _factory_form(
        args,
        resolved.name,
        f"{cls.__name__} cannot be rebuilt from its class and keyword arguments: {problem}",
    )


def _factory_form(args: Any, name: str, why: str) -> tuple[type, dict[str, Any]]:
    logger.info(
        "optitrainer: optim=%r: %s; answering transformers' factory form (the plugin's build)", name, why
    )
    return PluginOptimizerFactory, {"training_args": args}


def _context(choice: OptimizerChoice, args: Any, model: nn.Module) -> BuildContext:
    return BuildContext(
        model=model, args=args, options=dict(choice.options or {}), name=choice.resolved.spec.name
    )


def _groups_without_defaults(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The plugin's groups, keeping only the keys whose value differs from the optimizer's defaults."""
    return [
        {
            k: v
            for k, v in g.items()
            if k == "params" or k not in optimizer.defaults or not _same(v, optimizer.defaults[k])
        }
        for g in optimizer.param_groups
    ]


def _constructor_kwargs(cls: type, defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``defaults`` that ``cls.__init__`` takes (``defaults`` may hold derived ones)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in params}


def _rebuild_problem(built: torch.optim.Optimizer, cls: type, groups: list, kwargs: dict) -> str | None:
    """Why ``cls(groups, **kwargs)`` is not the optimizer the plugin built; ``None`` when it is."""
    try:
        rebuilt = cls([dict(g) for g in groups], **kwargs)
    except Exception as exc:  # noqa: BLE001 -- any failure means: not expressible this way
        return f"{cls.__name__}(groups, **kwargs) raised {type(exc).__name__}: {exc}"
    if not _same(built.defaults, rebuilt.defaults):
        return "its defaults differ"
    if len(built.param_groups) != len(rebuilt.param_groups):
        return f"the plugin builds {len(built.param_groups)} parameter groups"
    for a, b in zip(built.param_groups, rebuilt.param_groups):
        if [id(p) for p in a["params"]] != [id(p) for p in b["params"]]:
            return "the plugin groups the parameters otherwise"
        if not _same(
            {k: v for k, v in a.items() if k != "params"}, {k: v for k, v in b.items() if k != "params"}
        ):
            return "a parameter group's settings differ"
    mine, theirs = vars(built), vars(rebuilt)
    if mine.keys() != theirs.keys():
        return f"the plugin sets attribute(s) {sorted(mine.keys() ^ theirs.keys())}"
    for key, value in mine.items():
        if key in ("state", "param_groups", "defaults"):
            continue
        if key.endswith("hooks"):  # registered after construction, e.g. a plugin's fix on load_state_dict
            if len(value) != len(theirs[key]):
                return f"the plugin registers {key.strip('_')}"
        elif not _same(value, theirs[key]):
            return f"its attribute {key!r} differs"
    return None


def _same(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        both = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
        return both and x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y))
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(map(_same, x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    try:
        return bool(x == y)
    except Exception:  # noqa: BLE001 -- values that cannot be compared are not known to be equal
        return False


def _warn_about_callbacks(choice: OptimizerChoice, optimizer: torch.optim.Optimizer) -> None:
    spec = choice.resolved.spec
    if spec.callbacks is None:
        return
    names = ", ".join(type(c).__name__ for c in spec.callbacks(optimizer)) or "none for these settings"
    logger.warning(
        "optitrainer: optim=%r: OptiTrainer also adds the plugin's Trainer callbacks (%s); a Trainer that "
        "builds the optimizer from get_optimizer_cls_and_kwargs must add them itself "
        "(optitrainer.get_optimizer(%r).spec.callbacks(optimizer))",
        spec.name,
        names,
        spec.name,
    )
