"""Source text of throw-away plugin modules for registry tests."""

from __future__ import annotations


def plugin_source(*specs: tuple[str, str, str]) -> str:
    """Source of a plugin module: ``(CONST, name, extra OptimizerSpec kwargs)`` each, building SGD."""
    lines = [
        "from optitrainer.plugin import OptimizerSpec, Capabilities, Option",
        "def _build(ctx):",
        "    import torch",
        "    return torch.optim.SGD(ctx.param_groups(), lr=ctx.lr)",
    ]
    for const, name, extra in specs:
        lines.append(
            f"{const} = OptimizerSpec(name={name!r}, factory=_build, summary='test plugin', {extra})"
        )
    return "\n".join(lines) + "\n"
