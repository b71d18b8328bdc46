"""Turn ``optim_args`` (transformers' ``"k=v, k2=v2"`` string, or a dict) into typed values."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidOptimArgsError
from .plugin import OptimizerSpec, Option

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
# a comma ends a pair only when a new "key=" follows, so tuples like betas=(0.9,0.99) survive
_PAIR_SPLIT = re.compile(r",\s*(?=[A-Za-z_][\w.-]*\s*=)")


def split_optim_args(raw: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Split the string form into raw ``{key: str}``; a mapping is returned as a dict."""
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    if not isinstance(raw, str):
        raise InvalidOptimArgsError(
            f"optim_args must be a string like 'rank=64, scale=0.25' or a dict, got {type(raw).__name__}: {raw!r}"
        )
    text = raw.strip()
    if not text:
        return {}
    out: dict[str, Any] = {}
    for pair in _PAIR_SPLIT.split(text):
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise InvalidOptimArgsError(
                f"optim_args: cannot read {pair.strip()!r} in {raw!r}; write key=value pairs separated by "
                "commas, e.g. optim_args='rank=64, scale=0.25'"
            )
        if key in out:
            raise InvalidOptimArgsError(f"optim_args: key {key!r} given twice in {raw!r}; keep one")
        out[key] = value
    return out


def _convert(opt: Option, value: Any, optimizer: str) -> Any:
    def fail(expected: str) -> InvalidOptimArgsError:
        return InvalidOptimArgsError(
            f"optim_args for {optimizer!r}: {opt.name}={value!r} is not valid; expected {expected}"
            + (f" ({opt.help})" if opt.help else "")
            + f". Example: optim_args='{opt.name}={_example(opt)}'"
        )

    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        if opt.default is None:
            return None
        raise fail(opt.describe_type())

    t = opt.type
    try:
        if t is bool:
            if isinstance(value, bool):
                out: Any = value
            elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                out = value.strip().lower() in _TRUE
            elif isinstance(value, int) and value in (0, 1):
                out = bool(value)
            else:
                raise ValueError
        elif t is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                out = int(value)
            else:
                out = int(str(value).strip())
        elif t is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        elif t is tuple:
            if isinstance(value, str):
                parts = [p for p in re.split(r"[,:\s]+", value.strip().strip("()[]")) if p]
            else:
                parts = list(value)
            out = tuple(float(p) for p in parts)
            if opt.default is not None and len(out) != len(opt.default):
                raise ValueError
        elif t is str:
            if not isinstance(value, str):
                raise ValueError
            out = value.strip()
        else:
            out = t(value)
    except (TypeError, ValueError):
        raise fail(opt.describe_type()) from None

    if opt.choices is not None and out not in opt.choices:
        raise fail("one of " + ", ".join(repr(c) for c in opt.choices))
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        if (opt.low is not None and out < opt.low) or (opt.high is not None and out > opt.high):
            raise fail(opt.describe_type())
    return out


def _example(opt: Option) -> str:
    if opt.choices:
        return str(opt.choices[0])
    if opt.type is tuple and opt.default is not None:
        return "(" + ",".join(f"{x:g}" for x in opt.default) + ")"
    return str(opt.default)


def accepted_keys_text(spec: OptimizerSpec) -> str:
    if not spec.options:
        return f"{spec.name!r} accepts no optim_args"
    return f"{spec.name!r} accepts: " + ", ".join(f"{o.name}={o.default!r}" for o in spec.options)


def parse_optim_args(spec: OptimizerSpec, raw: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Typed options for ``spec``: every declared option, defaults filled, user values converted.

    Raises :class:`InvalidOptimArgsError` naming the unknown key and the accepted ones, or the bad
    value and what is expected.
    """
    given = split_optim_args(raw)
    known = spec.option_map
    unknown = [k for k in given if k not in known]
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(known), n=1)
            if close:
                hints.append(f"{k!r} (did you mean {close[0]!r}?)")
            else:
                hints.append(repr(k))
        raise InvalidOptimArgsError(
            f"optim_args for {spec.name!r}: unknown key {', '.join(hints)}. {accepted_keys_text(spec)}. "
            f"See `optitrainer info {spec.name}`."
        )
    return {
        name: (_convert(opt, given[name], spec.name) if name in given else opt.default)
        for name, opt in known.items()
    }
