"""Build one pytorch-optimizer class from a table row (torch and pytorch_optimizer imported here only)."""

from __future__ import annotations

import re
import warnings
from typing import Any

from optitrainer.plugin import BuildContext

from ._fixes import fixed_class
from ._row import Row

#: 2-D weights that stay on AdamW in the Muon family (as the core's ``muon`` and upstream's
#: ``prepare_muon_parameters``): token/position embeddings and the output head
MUON_EXCLUDE = r"(^|\.)(embed_tokens|embed_positions|wte|wpe|lm_head|embed_out|output|head)(\.|$)"
#: transformers' defaults for the Adam arguments: a value different from these was set on purpose
ADAM_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


def upstream_class(row: Row):
    """The upstream class of ``row`` (the subclass of :mod:`._fixes` where upstream has a bug)."""
    import importlib

    return fixed_class(row.upstream, getattr(importlib.import_module(row.module), row.cls))


def constructor_kwargs(row: Row, ctx: BuildContext) -> dict[str, Any]:
    """The keyword arguments (everything but the parameters) the table maps for ``row``."""
    kwargs: dict[str, Any] = {"lr": ctx.lr}
    if row.weight_decay:
        # the group value wins (0.0 for biases and norms); this is the default for other groups
        kwargs["weight_decay"] = ctx.weight_decay
    if row.betas_from_args:
        kwargs["betas"] = (ctx.args.adam_beta1, ctx.args.adam_beta2)
    if row.eps_from_args:
        kwargs["eps"] = ctx.args.adam_epsilon
    for name, kind, _default, _help, extra in row.options:
        value = ctx.options[name]
        if value is None and "none_means" in extra:
            value = float(extra["none_means"])
        elif kind == "tuple" and value is not None:
            value = tuple(value)
        kwargs[name] = value
    if row.upstream == "ranger21":  # its built-in warmup/warm-down schedule needs the run's length
        kwargs["num_iterations"] = ctx.args.max_steps
    return kwargs


def param_groups(row: Row, ctx: BuildContext) -> list[dict[str, Any]]:
    """The trainer's decay / no-decay groups; the Muon family splits each by ``use_muon``."""
    groups = ctx.param_groups()
    if row.groups != "muon":
        return groups
    pattern = re.compile(ctx.options.get("muon_exclude") or MUON_EXCLUDE)
    muon_ids = {id(p) for n, p in ctx.named_parameters() if p.ndim == 2 and not pattern.search(n)}
    out = []
    for use_muon in (True, False):
        for g in groups:
            # AdamW groups: no "lr" key, so upstream gives them adamw_lr (the schedule scales both)
            out.append(
                {
                    **g,
                    "params": [p for p in g["params"] if (id(p) in muon_ids) == use_muon],
                    "use_muon": use_muon,
                }
            )
    return out


def build(row: Row, ctx: BuildContext):
    """``upstream_class(row)(groups, **kwargs)``: the upstream optimizer, unchanged but for :mod:`._fixes`."""
    kwargs = constructor_kwargs(row, ctx)
    return upstream_class(row)(param_groups(row, ctx), **kwargs)


def validate_arguments(row: Row):
    """Problems found from the training arguments alone; settings the optimizer does not read warn."""

    def check(args, options) -> list[str]:
        problems = []
        # getattr with defaults: callers may pass a partial namespace (the kit's refusal check does)
        value = {
            k: getattr(args, k, d) for k, d in {**ADAM_DEFAULTS, "weight_decay": 0.0, "max_steps": 1}.items()
        }
        unread = []
        if not row.betas_from_args:
            unread += [k for k in ("adam_beta1", "adam_beta2") if value[k] != ADAM_DEFAULTS[k]]
        if not row.eps_from_args and value["adam_epsilon"] != ADAM_DEFAULTS["adam_epsilon"]:
            unread.append("adam_epsilon")
        if not row.weight_decay and value["weight_decay"]:
            unread.append("weight_decay")
        if unread:
            own = [o[0] for o in row.options]
            warnings.warn(
                f"{row.name}: {', '.join(f'{k}={value[k]!r}' for k in unread)} not read by "
                f"pytorch_optimizer.{row.cls} (its own defaults differ or it has no such argument); "
                f"its optim_args are {own or 'none'}",
                UserWarning,
                stacklevel=2,
            )
        if row.upstream == "ranger21" and value["max_steps"] <= 0:
            problems.append(
                f"{row.name}: Ranger21 runs its own warmup and warm-down over the whole run and needs its "
                "length; set max_steps (> 0) in the training arguments"
            )
        return problems

    return check
