"""bitsandbytes' optimizers built as ``transformers.Trainer`` builds them, with their overrides kept local.

Imported only when an optimizer is built (it imports torch and bitsandbytes).
"""

from __future__ import annotations

import logging
from collections import ChainMap
from typing import Any

import bitsandbytes.optim as bnb_optim
from torch import nn

from optitrainer.plugin import BuildContext

logger = logging.getLogger(__name__)


class _OwnOverrides:
    """Stands in for bitsandbytes' process-wide ``GlobalOptimManager`` inside one optimizer.

    bitsandbytes reads three tables from its manager: ``module_weight_config_triple`` (overrides a user
    registered per module, honoured here), ``pid2config`` (overrides by parameter id: the user's are
    honoured, the ones this optimizer's ``check_overrides`` derives are kept here) and ``index2config``
    (overrides by ``(group, index)``). The shared ``index2config`` is filled by every optimizer and never
    cleared, so the next optimizer with the same layout inherits it: the next trainer in the process, or
    every per-parameter optimizer of the layerwise mode (each one's parameter sits at ``(0, 0)``) after a
    single embedding override. Here it belongs to this optimizer alone.
    """

    def __init__(self, shared: Any) -> None:
        self._shared = shared
        self._own: dict[int, dict[str, Any]] = {}
        self.index2config: dict[tuple[int, int], dict[str, Any]] = {}

    @property
    def module_weight_config_triple(self) -> list:
        return self._shared.module_weight_config_triple

    @property
    def pid2config(self) -> ChainMap:
        # writes land in this optimizer's table; reads also see the user's override_config calls
        return ChainMap(self._own, self._shared.pid2config)


class _LocalOverrides:
    """Mixin: ``keep_32bit`` parameters get 32-bit states; no override leaks in from, or out to, other optimizers."""

    def __init__(self, params, *, keep_32bit=(), **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.mng = _OwnOverrides(self.mng)
        self._keep_32bit = frozenset(id(p) for p in keep_32bit)

    def get_config(self, gindex, pindex, group):
        config = super().get_config(gindex, pindex, group)
        if id(self.param_groups[gindex]["params"][pindex]) in self._keep_32bit:
            config["optim_bits"] = 32
        return config


class AdamW(_LocalOverrides, bnb_optim.AdamW):
    """``bitsandbytes.optim.AdamW`` with per-optimizer overrides."""


class AdEMAMix(_LocalOverrides, bnb_optim.AdEMAMix):
    """``bitsandbytes.optim.AdEMAMix`` with per-optimizer overrides."""


class Lion(_LocalOverrides, bnb_optim.Lion):
    """``bitsandbytes.optim.Lion`` with per-optimizer overrides."""


class RMSprop(_LocalOverrides, bnb_optim.RMSprop):
    """``bitsandbytes.optim.RMSprop`` with per-optimizer overrides."""


CLASSES = {"adamw": AdamW, "ademamix": AdEMAMix, "lion": Lion, "rmsprop": RMSprop}


def optimizer_kwargs(ctx: BuildContext, family: str, optim_bits: int, is_paged: bool) -> dict[str, Any]:
    """The keyword arguments transformers' ``_get_bitsandbytes_optimizer`` passes, from typed options."""
    o, args = ctx.options, ctx.args
    kwargs: dict[str, Any] = {"lr": ctx.lr, "weight_decay": ctx.weight_decay, "optim_bits": optim_bits}
    if family == "adamw":
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    elif family == "lion":
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2))
    elif family == "ademamix":
        kwargs.update(betas=ademamix_betas(ctx), alpha=o["alpha"], eps=_or(o["eps"], args.adam_epsilon))
        # transformers passes these only when given: bitsandbytes' schedule tests them for truth
        kwargs.update({k: o[k] for k in ("t_alpha", "t_beta3") if o[k] is not None})
    elif family == "rmsprop":
        kwargs.update(alpha=o["alpha"], eps=o["eps"], momentum=o["momentum"])
    if family != "rmsprop":  # bitsandbytes' RMSprop has no paged form
        kwargs["is_paged"] = is_paged
    if optim_bits == 8:
        kwargs["min_8bit_size"] = o["min_8bit_size"]
    return kwargs


def ademamix_betas(ctx: BuildContext) -> tuple[float, float, float]:
    o, args = ctx.options, ctx.args
    return (_or(o["beta1"], args.adam_beta1), _or(o["beta2"], args.adam_beta2), o["beta3"])


def _or(value, default):
    return default if value is None else value


def embedding_weights(model: nn.Module) -> list[nn.Parameter]:
    """transformers' rule: the ``weight`` of every ``nn.Embedding`` keeps 32-bit states."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]


def build(ctx: BuildContext, family: str, optim_bits: int, is_paged: bool):
    kwargs = optimizer_kwargs(ctx, family, optim_bits, is_paged)
    keep = ()
    if optim_bits == 8 and ctx.options["embeddings_32bit"]:
        keep = embedding_weights(ctx.model)
        mine = {id(p) for _, p in ctx.named_parameters()}
        kept = sum(p.numel() for p in keep if id(p) in mine)
        if kept:
            logger.info("%s: %.3fM embedding parameters keep 32-bit states", ctx.name, kept / 2**20)
    return CLASSES[family](ctx.param_groups(), keep_32bit=keep, **kwargs)
