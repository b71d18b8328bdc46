"""``optitrainer list [--engine E]`` / ``optitrainer info NAME`` / ``optitrainer matrix`` / ``optitrainer bench ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from .compat import describe_engines
from .errors import OptiTrainerError
from .plugin import ENGINE_MODES
from .registry import KNOWN_PLUGINS, LAYERWISE_SUFFIX, REGISTRY, is_installed
from .support_matrix import (
    ENGINE_LABELS,
    NO,
    YES,
    SupportRow,
    render_markdown,
    replace_matrix,
    support_matrix,
    support_rows,
)


def _engine_key(text: str) -> str:
    """``zero3``, ``ZeRO-3``, ``FSDP2``, ``ddp``… → a key of ``ENGINE_MODES``."""
    key = text.strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    key = key.removeprefix("deepspeed")
    if key not in ENGINE_MODES:
        raise argparse.ArgumentTypeError(
            f"unknown engine {text!r}; use one of {', '.join(ENGINE_MODES)} (e.g. --engine zero3)"
        )
    return key


def _list(console: Console, engine: str | None = None) -> int:
    rows = REGISTRY.list()
    title = "optitrainer optimizers"
    forms: dict[str, list[str]] = {}
    if engine is not None:
        for row in support_matrix():
            if not row.error and engine in row.engines:
                forms.setdefault(row.base, []).append("layerwise" if row.layerwise else "standard")
        rows = [r for r in rows if r.name in forms]
        title += f" that train under {describe_engines(frozenset({engine}))}"
    table = Table(title=title, show_lines=False)
    for col in ("name", "aliases", "modes / capabilities", "provided by", "installed", "summary"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if r.error:
            table.add_row(r.name, "", "", str(r.provenance), "[red]broken[/red]", f"[red]{r.error}[/red]")
            continue
        modes = ["standard"] + ([f"{LAYERWISE_SUFFIX.lstrip('_')}"] if "layerwise" in r.capabilities else [])
        if engine is not None:  # only the forms that run under the engine
            modes = forms[r.name]
        caps = ", ".join(modes + [c for c in r.capabilities if c != "layerwise"])
        installed = (
            "[green]yes[/green]"
            if r.installed
            else f"[yellow]no[/yellow]: pip install {' '.join(r.requires)}"
        )
        table.add_row(r.name, ", ".join(r.aliases), caps, str(r.provenance), installed, r.summary)
    console.print(table)
    if engine is not None:
        console.print(
            f"Every other registered name is refused under {describe_engines(frozenset({engine}))} before step 1; "
            "`optitrainer info NAME` says why, `optitrainer matrix` shows every engine."
        )
        return 0
    registered = {r.name for r in rows} | {a for r in rows for a in r.aliases}
    missing = sorted({d for n, d in KNOWN_PLUGINS.items() if n not in registered})
    if missing:
        console.print("Plugins not installed: " + ", ".join(missing) + " (pip install <name>)")
    console.print(
        "Any other name transformers knows (e.g. adamw_bnb_8bit) still works through transformers' own handler."
    )
    return 0


def _info(console: Console, name: str) -> int:
    try:
        resolved = REGISTRY.resolve(name, check_installed=False)
    except OptiTrainerError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    spec = resolved.spec
    console.print(f"[bold]{spec.name}[/bold] — {spec.summary}")
    console.print(f"provided by: {resolved.provenance}")
    if spec.aliases:
        console.print("aliases: " + ", ".join(spec.aliases))
    modes = "standard" + (f", {spec.name}{LAYERWISE_SUFFIX}" if spec.capabilities.layerwise else "")
    console.print(f"modes: {modes}")
    flags = spec.capabilities.flags()
    if flags:
        console.print("capabilities: " + ", ".join(flags))
    if spec.requires:
        state = "installed" if is_installed(spec) else "[yellow]not installed[/yellow]"
        console.print(f"requires: {' '.join(spec.requires)} ({state}; install: {spec.pip_command()})")
    if spec.transformers_name:
        console.print(f"transformers name: {spec.transformers_name}")
    if spec.options:
        table = Table(title="optim_args")
        for col in ("key", "type", "default", "help"):
            table.add_column(col, overflow="fold")
        for o in spec.options:
            table.add_row(o.name, o.describe_type(), repr(o.default), o.help)
        console.print(table)
        example = ", ".join(f"{o.name}={o.default}" for o in spec.options[:2])
        console.print(f'example: optim="{spec.name}", optim_args="{example}"')
    elif resolved.is_transformers_fallback:
        console.print("optim_args: passed unparsed to transformers' own handler")
    else:
        console.print("optim_args: none")
    if resolved.is_transformers_fallback:
        console.print("Distributed: no engine is refused; transformers decides where its own optimizers run")
    else:
        _print_distributed(console, support_rows(resolved.requested))
    if spec.docs:
        console.print(spec.docs)
    return 0


def _print_distributed(console: Console, rows: list[SupportRow]) -> None:
    """Which engines each form trains under, and why the others are refused."""
    console.print("[bold]Distributed[/bold] (checked before step 1; see `optitrainer matrix`):")
    for row in rows:
        console.print(f"  {row.name}: {describe_engines(row.engines)}", soft_wrap=True, highlight=False)
        refused: dict[str, list[str]] = {}
        for mode in ENGINE_MODES:
            cell = row.cells[mode]
            if not cell.supported:
                refused.setdefault(cell.why or "", []).append(mode)
        for why, modes in refused.items():
            console.print(
                f"    refused under {describe_engines(frozenset(modes))}: {why}",
                soft_wrap=True,
                highlight=False,
            )


def _matrix(console: Console, names: list[str], markdown: bool, write: str | None) -> int:
    try:
        rows = support_matrix() if not names else [r for n in names for r in support_rows(n)]
    except OptiTrainerError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    text = render_markdown(rows)
    if write is not None:
        from pathlib import Path

        path = Path(write)
        try:
            path.write_text(replace_matrix(path.read_text(encoding="utf-8"), text), encoding="utf-8")
        except (OSError, ValueError) as exc:
            console.print(f"[red]{path}: {exc}[/red]")
            return 2
        console.print(f"wrote the support matrix into {path}")
        return 0
    if markdown:
        print(text, end="")
        return 0
    table = Table(title="distributed engines each optim= form trains under (✓) or is refused under (✗)")
    table.add_column("optim=", no_wrap=True)
    for label in ENGINE_LABELS.values():
        table.add_column(label, justify="center")
    for row in rows:
        if row.error:
            table.add_row(row.name, *["[yellow]?[/yellow]"] * len(ENGINE_LABELS))
            continue
        table.add_row(
            row.name,
            *(
                f"[green]{YES}[/green]" if row.cells[m].supported else f"[red]{NO}[/red]"
                for m in ENGINE_MODES
            ),
        )
    console.print(table)
    console.print("Why a cell is ✗: `optitrainer info NAME`, or `optitrainer matrix --markdown`.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="optitrainer", description="Optimizers for transformers.Trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="every registered optimizer, with its plugin distribution")
    lst.add_argument(
        "--engine",
        type=_engine_key,
        help=f"only the names that train under this distributed engine ({', '.join(ENGINE_MODES)})",
    )
    info = sub.add_parser("info", help="one optimizer's optim_args, capabilities and install hint")
    info.add_argument("name")
    matrix = sub.add_parser("matrix", help="which distributed engine each optimizer trains under")
    matrix.add_argument("names", nargs="*", help="only these optimizers (default: every registered one)")
    matrix.add_argument("--markdown", action="store_true", help="print a markdown table and the reasons")
    matrix.add_argument(
        "--write",
        metavar="FILE",
        help="rewrite the markdown between <!-- matrix:start --> and <!-- matrix:end --> in FILE",
    )
    sub.add_parser("bench", help="measure memory, speed and loss per optimizer (see `optitrainer bench -h`)")
    ns = parser.parse_args(argv)
    console = Console(width=max(Console().width, 140))
    if ns.command == "list":
        return _list(console, ns.engine)
    if ns.command == "matrix":
        return _matrix(console, ns.names, ns.markdown, ns.write)
    return _info(console, ns.name)


if __name__ == "__main__":
    raise SystemExit(main())
