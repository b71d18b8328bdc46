"""Turn ``optim_args`` (transformers' ``"k=v, k2=v2"`` string, or a dict) into typed values."""

from __future__ import annotations

import math
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
    for pair in _split_pairs(text):
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


def _split_pairs(text: str) -> list[str]:
    """Split at the commas that are outside quotes and start a new ``key=``."""
    pairs, start, quote = [], 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "," and _PAIR_SPLIT.match(text, i):
            pairs.append(text[start:i])
            start = i + 1
    pairs.append(text[start:])
    return pairs


def _convert(opt: Option, value: Any, optimizer: str) -> Any:
    def fail(expected: str) -> InvalidOptimArgsError:
        return InvalidOptimArgsError(
            f"optim_args for {optimizer!r}: {opt.name}={value!r} is not valid; expected "
            + _as_0_1_0_said_it(opt, expected)
            + (f" ({opt.help})" if opt.help else "")
            + f". Example: optim_args='{opt.name}={_example(opt)}'"
        )

    if isinstance(value, str):
        value = _unquote(value.strip())
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if opt.accepts_none:
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
            out = _finite(float(value))
        elif t is tuple:
            if isinstance(value, str):
                parts = [p for p in re.split(r"[,:\s]+", value.strip("()[] ")) if p]
            else:
                parts = list(value)
            out = tuple(_element(opt.element, p) for p in parts)
            if opt.tuple_length is not None and len(out) != opt.tuple_length:
                raise ValueError
        elif t is str:
            if not isinstance(value, str):
                raise ValueError
            out = value
        else:
            out = t(value)
    except (TypeError, ValueError):
        raise fail(opt.describe_type()) from None

    if opt.choices is not None and out not in opt.choices:
        raise fail("one of " + ", ".join(repr(c) for c in opt.choices))
    numbers = out if isinstance(out, tuple) else (out,)
    for x in numbers:
        if isinstance(x, (int, float)) and not isinstance(x, bool) and not _in_bounds(opt, x):
            raise fail(opt.describe_type())
    return out


def _as_0_1_0_said_it(opt: Option, expected: str) -> str:
    """What was expected, beginning as optitrainer 0.1.0 (plugin API 1.0) wrote it.

    0.1.0 wrote a float option's type ``finite float in [0, 1]``; the first commits wrote ``float in [0, 1]``,
    as :meth:`Option.describe_type` does again (``float in [0, 1], finite``). Plugin tests match substrings of
    either (``expected finite float``, ``expected float``), so a float option's error carries 0.1.0's wording
    first, exactly as 0.1.0 printed it, then today's.
    """
    suffix = ", finite"
    if opt.type is not float or opt.choices or not expected.endswith(suffix):
        return expected
    return f"finite {expected[: -len(suffix)]}; expected {expected}"


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _finite(x: float) -> float:
    if math.isnan(x) or math.isinf(x):
        raise ValueError
    return x


def _element(kind: type, item: Any) -> float | int:
    if isinstance(item, bool):
        raise ValueError
    if kind is int:
        if isinstance(item, float):
            if not item.is_integer():
                raise ValueError
            return int(item)
        return int(str(item).strip())
    return _finite(float(item))


def _in_bounds(opt: Option, x: float) -> bool:
    if opt.low is not None and (x <= opt.low if opt.low_exclusive else x < opt.low):
        return False
    if opt.high is not None and (x >= opt.high if opt.high_exclusive else x > opt.high):
        return False
    return True


def _example(opt: Option) -> str:
    if opt.choices:
        return str(opt.choices[0])
    if opt.type is tuple:
        items = opt.default if opt.default is not None else (1,) * (opt.tuple_length or 2)
        return "(" + ",".join(f"{x:g}" for x in items) + ")"
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
