"""Non-default values for an :class:`~optitrainer.plugin.Option`, to see whether it changes anything.

Per type: a bool is flipped; a number is scaled inside its bounds (halved, doubled, ...); a choice
becomes another choice; a tuple has its items scaled; a nullable option also tries ``None``. Each
value goes through the real ``optim_args`` parser, so only values a user could pass are tried.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidOptimArgsError
from ..options import parse_optim_args
from ..plugin import OptimizerSpec, Option


def _raw(opt: Option) -> list[Any]:
    d = opt.default
    if opt.choices:
        return [c for c in opt.choices if c != d]
    if opt.type is bool:
        return [True, False] if d is None else [not d]
    if opt.type is int:
        base = 1 if d is None else d
        return [base * 2, base + 1, base // 2, base - 1, 1, 2, 8]
    if opt.type is float:
        if not d:
            return [0.5, 0.1, 1e-3, 1.0, 2.0, -0.5]
        return [d * 0.5, d * 2, d * 0.9, d * 1.1, -d]
    if opt.type is tuple:
        n = opt.tuple_length or 2
        items = list(d) if d is not None else [0.5] * n
        if opt.element is int:
            return [tuple(x * 2 or 1 for x in items), tuple(x + 1 for x in items)]
        return [tuple(x * 0.5 if x else 0.5 for x in items), tuple(x * 0.9 for x in items)]
    if opt.type is str:
        # free text is often a module name or a regex over parameter names: try ones the tiny Llama has
        return ["", "lm_head", "embed_tokens", "model.layers.0", r".*\.mlp\..*", "x"]
    return []


def non_default_values(spec: OptimizerSpec, opt: Option) -> list[Any]:
    """Values of ``opt`` other than its default that the parser accepts, in the order to try them."""
    values = _raw(opt) + ([None] if opt.accepts_none and opt.default is not None else [])
    out: list[Any] = []
    for value in values:
        if value == opt.default or value in out:
            continue
        try:
            parsed = parse_optim_args(spec, {opt.name: value})[opt.name]
        except InvalidOptimArgsError:
            continue
        if parsed != opt.default:
            out.append(parsed)
    return out
