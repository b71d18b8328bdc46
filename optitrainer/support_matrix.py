"""Which optimizer trains under which distributed engine: a table computed from capabilities only.

Every registered name and its ``_layerwise`` form, against every engine of
:data:`optitrainer.plugin.ENGINE_MODES`. A cell is supported when :func:`optitrainer.compat.supported_engines`
says so; otherwise it holds the refusal the trainer would raise (:func:`optitrainer.compat.engine_conflict`).
Nothing here imports an upstream optimizer package: names are resolved with ``check_installed=False``.

``optitrainer matrix`` prints it; ``optitrainer matrix --markdown`` gives the table that
``docs/distributed.md`` holds between :data:`MATRIX_START` and :data:`MATRIX_END`
(``optitrainer matrix --write docs/distributed.md`` rewrites it there).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .compat import describe_engines, engine_conflict, engine_refusal_reason
from .engine import Engine
from .plugin import ENGINE_MODES
from .registry import LAYERWISE_SUFFIX, REGISTRY, Provenance

__all__ = [
    "ENGINE_LABELS",
    "MATRIX_END",
    "MATRIX_START",
    "SupportCell",
    "SupportRow",
    "engine_for_mode",
    "matrix_in",
    "render_markdown",
    "replace_matrix",
    "support_matrix",
    "support_rows",
]

#: column headings, one per key of :data:`ENGINE_MODES`
ENGINE_LABELS = {
    "ddp": "DDP",
    "zero0": "ZeRO-0",
    "zero1": "ZeRO-1",
    "zero2": "ZeRO-2",
    "zero3": "ZeRO-3",
    "fsdp1": "FSDP1",
    "fsdp2": "FSDP2",
}
MATRIX_START = "<!-- matrix:start -->"
MATRIX_END = "<!-- matrix:end -->"
YES, NO = "✓", "✗"


def engine_for_mode(mode: str, world_size: int = 2) -> Engine:
    """A distributed :class:`Engine` whose :attr:`~Engine.mode` is ``mode`` (a key of :data:`ENGINE_MODES`)."""
    return Engine.for_mode(mode, world_size)


@dataclass(frozen=True)
class SupportCell:
    """One optimizer form under one engine."""

    mode: str
    supported: bool
    #: the trainer's refusal (``engine_conflict``), without the "(from ...)" of a real launch
    refusal: str | None = None
    #: why it is refused: the part of the refusal that explains it (the plugin's ``distributed_note``,
    #: or why layerwise mode cannot run there)
    why: str | None = None


@dataclass(frozen=True)
class SupportRow:
    """One ``optim=`` form (``name`` or ``name_layerwise``) against every engine."""

    name: str
    base: str
    layerwise: bool
    provenance: Provenance
    cells: dict[str, SupportCell] = field(default_factory=dict)
    #: set when the plugin failed to load (then ``cells`` is empty)
    error: str | None = None

    @property
    def engines(self) -> frozenset[str]:
        """The engine keys this form trains under."""
        return frozenset(m for m, c in self.cells.items() if c.supported)


def _row(resolved) -> SupportRow:
    cells = {}
    for mode in ENGINE_MODES:
        engine = engine_for_mode(mode)
        why = engine_refusal_reason(resolved, engine)
        if why is None:
            cells[mode] = SupportCell(mode, True)
        else:
            cells[mode] = SupportCell(mode, False, engine_conflict(resolved, engine), why)
    return SupportRow(resolved.name, resolved.spec.name, resolved.layerwise, resolved.provenance, cells)


def support_matrix(names: Iterable[str] | None = None) -> list[SupportRow]:
    """One row per registered optimizer (or per name of ``names``) and one per its ``_layerwise`` form.

    Computed from the plugins' capabilities only; no upstream optimizer package is imported.
    """
    wanted = None if names is None else set(names)
    rows: list[SupportRow] = []
    for info in REGISTRY.list():
        if wanted is not None and info.name not in wanted:
            continue
        if info.error:
            rows.append(SupportRow(info.name, info.name, False, info.provenance, error=info.error))
            continue
        rows.extend(support_rows(info.name))
    return rows


def support_rows(name: str) -> list[SupportRow]:
    """The rows of one optimizer (any ``optim=`` value: a name, an alias, a ``_layerwise`` form, or a
    name only transformers knows): its standard form, then its ``_layerwise`` form where it has one.
    """
    spec = REGISTRY.resolve(name, check_installed=False).spec
    rows = [_row(REGISTRY.resolve(spec.name, check_installed=False))]
    if spec.capabilities.layerwise:
        rows.append(_row(REGISTRY.resolve(spec.name + LAYERWISE_SUFFIX, check_installed=False)))
    return rows


def _engine_list(modes: Iterable[str]) -> str:
    """``ZeRO-0/1/2/3, FSDP1/2``: engine keys, compactly."""
    return describe_engines(frozenset(modes)).replace("DeepSpeed ", "")


def _units(rows: list[SupportRow], collapse_above: int | None) -> list[tuple[str, SupportRow]]:
    """``(label, row)`` per table line: a distribution with more forms than ``collapse_above`` gets one
    line per distinct set of cells (``first`` … ``last`` (N forms of dist)), the others one per form."""
    per_dist: dict[str, list[SupportRow]] = {}
    for row in rows:
        per_dist.setdefault(row.provenance.distribution, []).append(row)
    units, done = [], set()
    for row in rows:
        dist = row.provenance.distribution
        group = per_dist[dist]
        if collapse_above is None or len(group) <= collapse_above or row.error:
            units.append((f"`{row.name}`", row))
            continue
        key = (dist, tuple(sorted(row.engines)))
        if key in done:
            continue
        done.add(key)
        same = [r for r in group if not r.error and tuple(sorted(r.engines)) == key[1]]
        units.append((f"`{same[0].name}` … `{same[-1].name}` ({len(same)} forms of {dist})", row))
    return units


def render_markdown(rows: list[SupportRow], collapse_above: int | None = 20) -> str:
    """A markdown table (✓ trains correctly, ✗ refused before step 1) and the reasons for every ✗.

    A distribution with more than ``collapse_above`` forms (a bridge to a whole catalogue) is shown as
    one line per distinct row of cells; ``None`` lists every form.
    """
    header = ["`optim=`", *ENGINE_LABELS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *[":---:"] * len(ENGINE_LABELS)]) + "|"]
    # why -> engines refused for that reason -> the forms refused there
    reasons: dict[str, dict[str, list[str]]] = {}
    for label, row in _units(rows, collapse_above):
        if row.error:
            lines.append(f"| {label} | " + " | ".join(["?"] * len(ENGINE_LABELS)) + " |")
            continue
        cells = [YES if row.cells[m].supported else NO for m in ENGINE_MODES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        by_why: dict[str, list[str]] = {}
        for mode in ENGINE_MODES:
            cell = row.cells[mode]
            if not cell.supported:
                by_why.setdefault(_reason_key(cell), []).append(mode)
        for why, modes in by_why.items():
            reasons.setdefault(why, {}).setdefault(_engine_list(modes), []).append(label)
    out = "\n".join(lines) + "\n"
    broken = [r for r in rows if r.error]
    if reasons or broken:
        out += "\nWhy ✗:\n\n"
        for why, groups in reasons.items():
            out += f"- {why}: " + "; ".join(
                f"{', '.join(who)} ({engines})" for engines, who in groups.items()
            )
            out += "\n"
        for row in broken:
            out += f"- `{row.name}` ({row.provenance}) failed to load: {row.error}\n"
    return out


def _reason_key(cell: SupportCell) -> str:
    """The reason of a refused cell, with the engine's name taken out where it is the only difference."""
    why = cell.why or ""
    undeclared = f"the plugin does not declare {engine_for_mode(cell.mode)} support"
    return "the plugin does not declare support (no `distributed_note`)" if why == undeclared else why


def replace_matrix(text: str, block: str) -> str:
    """``text`` with everything between :data:`MATRIX_START` and :data:`MATRIX_END` replaced by ``block``."""
    start, end = text.find(MATRIX_START), text.find(MATRIX_END)
    if start < 0 or end < start:
        raise ValueError(f"no {MATRIX_START} ... {MATRIX_END} markers (in this order) in the text")
    return text[: start + len(MATRIX_START)] + "\n" + block.rstrip("\n") + "\n" + text[end:]


def matrix_in(text: str) -> str:
    """What ``text`` holds between the markers (stripped of the newlines next to them)."""
    start, end = text.find(MATRIX_START), text.find(MATRIX_END)
    if start < 0 or end < start:
        raise ValueError(f"no {MATRIX_START} ... {MATRIX_END} markers (in this order) in the text")
    return text[start + len(MATRIX_START) : end].strip("\n") + "\n"
