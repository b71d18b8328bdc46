"""One row of the bridge's table: what the spec of one pytorch-optimizer class is built from."""

from __future__ import annotations

from typing import Any, NamedTuple


class Row(NamedTuple):
    """One optimizer of ``pytorch_optimizer``, as ``tools/generate_table.py`` read it.

    ``options``: ``(name, type, default, help, extra)`` with ``type`` one of ``"bool"``, ``"int"``,
    ``"float"``, ``"str"``, ``"tuple"`` and ``extra`` holding ``choices``/``length``/``element``/
    ``none_means`` (the upstream value an option's ``None`` stands for, e.g. ``inf``, which ``optim_args``
    cannot spell). ``fixed``: constructor arguments left at upstream's default (not expressible as an
    option: dtypes, callables, enums), shown in the README.
    """

    name: str
    upstream: str
    module: str
    cls: str
    summary: str
    betas_from_args: bool
    eps_from_args: bool
    weight_decay: bool
    options: tuple[tuple[str, str, Any, str, dict[str, Any]], ...]
    fixed: tuple[str, ...] = ()
    groups: str = "plain"
    train_eval: bool = False
    recommended_lr: float | None = None
    layerwise: bool = False
