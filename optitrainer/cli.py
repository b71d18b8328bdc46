"""``optitrainer list`` / ``optitrainer info NAME`` / ``optitrainer bench ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from .errors import OptiTrainerError
from .registry import KNOWN_PLUGINS, LAYERWISE_SUFFIX, REGISTRY, is_installed


def _list(console: Console) -> int:
    rows = REGISTRY.list()
    table = Table(title="optitrainer optimizers", show_lines=False)
    for col in ("name", "aliases", "modes / capabilities", "provided by", "installed", "summary"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if r.error:
            table.add_row(r.name, "", "", str(r.provenance), "[red]broken[/red]", f"[red]{r.error}[/red]")
            continue
        modes = ["standard"] + ([f"{LAYERWISE_SUFFIX.lstrip('_')}"] if "layerwise" in r.capabilities else [])
        caps = ", ".join(modes + [c for c in r.capabilities if c != "layerwise"])
        installed = (
            "[green]yes[/green]"
            if r.installed
            else f"[yellow]no[/yellow]: pip install {' '.join(r.requires)}"
        )
        table.add_row(r.name, ", ".join(r.aliases), caps, str(r.provenance), installed, r.summary)
    console.print(table)
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
    if spec.docs:
        console.print(spec.docs)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="optitrainer", description="Optimizers for transformers.Trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered optimizer, with its plugin distribution")
    info = sub.add_parser("info", help="one optimizer's optim_args, capabilities and install hint")
    info.add_argument("name")
    sub.add_parser("bench", help="measure memory, speed and loss per optimizer (see `optitrainer bench -h`)")
    ns = parser.parse_args(argv)
    console = Console(width=max(Console().width, 140))
    if ns.command == "list":
        return _list(console)
    return _info(console, ns.name)


if __name__ == "__main__":
    raise SystemExit(main())
