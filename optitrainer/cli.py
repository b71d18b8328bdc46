"""``optitrainer list`` / ``info NAME`` / ``check NAME`` / ``matrix`` / ``bench ...``.

``list`` and ``info`` import neither torch nor transformers (spec modules only); ``check`` runs the
conformance kit (:mod:`optitrainer.kit`), which trains.
"""

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


def _capability_matches(row, wanted: str) -> bool:
    """``--capability``: a flag of ``optitrainer list`` (layerwise, fused-backward, train/eval…) or an engine."""
    key = wanted.strip().lower().replace("_", "-")
    flags = {f.replace("_", "-") for f in row.capabilities}
    aliases = {"train-eval": "train/eval", "fused": "fused-backward", "owns-backward": "fused-backward"}
    if aliases.get(key, key) in flags:
        return True
    if key in ("fp16", "gradient-accumulation", "grad-accum", "standard"):
        spec = REGISTRY.resolve(row.name, check_installed=False).spec
        if key == "fp16":
            return bool(spec.capabilities.fp16)
        if key == "standard":
            return True
        return bool(spec.capabilities.gradient_accumulation)
    try:
        engine = _engine_key(key)
    except argparse.ArgumentTypeError:
        return False
    return engine in row.engines


CAPABILITY_HELP = (
    "only names with this capability (repeatable): layerwise, fused-backward, target-modules, train/eval, "
    "cuda-only, fp16, gradient-accumulation, or an engine they train under (ddp, zero0..zero3, fsdp1, fsdp2)"
)


def _filter_rows(rows, dist: str | None, capabilities: Sequence[str], grep: str | None):
    if dist:
        key = dist.lower().replace("_", "-")
        rows = [r for r in rows if r.provenance.distribution.lower().replace("_", "-") == key]
    for cap in capabilities:
        rows = [r for r in rows if not r.error and _capability_matches(r, cap)]
    if grep:
        needle = grep.lower()
        rows = [
            r
            for r in rows
            if needle in " ".join([r.name, *r.aliases, r.summary, str(r.provenance), *r.capabilities]).lower()
        ]
    return rows


def _row_json(r) -> dict:
    out = {
        "name": r.name,
        "distribution": r.provenance.distribution,
        "version": r.provenance.version,
        "aliases": list(r.aliases),
        "summary": r.summary,
        "installed": r.installed,
        "requires": list(r.requires),
        "error": r.error,
    }
    if r.error:
        return out
    spec = REGISTRY.resolve(r.name, check_installed=False).spec
    caps = spec.capabilities
    out.update(
        modes=list(getattr(r, "modes", ("standard", "layerwise") if caps.layerwise else ("standard",))),
        recommended_lr=spec.recommended_lr,
        learning_rate_range=list(spec.learning_rate_range) if spec.learning_rate_range else None,
        capabilities={
            "layerwise": caps.layerwise,
            "owns_backward": caps.owns_backward,
            "needs_target_modules": caps.needs_target_modules,
            "train_eval_modes": caps.train_eval_modes,
            "gradient_accumulation": caps.gradient_accumulation,
            "gradient_clipping": caps.gradient_clipping,
            "fp16": caps.fp16,
            "requires_cuda": caps.requires_cuda,
            "changes_trainable": caps.changes_trainable,
            "engines": [m for m in ENGINE_MODES if m in caps.engines],
        },
        options=[o.name for o in spec.options],
        transformers_name=spec.transformers_name,
    )
    return out


def _list(
    console: Console,
    engine: str | None = None,
    *,
    dist: str | None = None,
    capabilities: Sequence[str] = (),
    grep: str | None = None,
    fmt: str = "table",
) -> int:
    every = REGISTRY.list()
    rows = _filter_rows(every, dist, capabilities, grep)
    title = "optitrainer optimizers"
    forms: dict[str, list[str]] = {}
    if engine is not None:
        for row in support_matrix():
            if not row.error and engine in row.engines:
                forms.setdefault(row.base, []).append("layerwise" if row.layerwise else "standard")
        rows = [r for r in rows if r.name in forms]
        title += f" that train under {describe_engines(frozenset({engine}))}"
    if fmt == "json":
        import json

        print(json.dumps([_row_json(r) for r in rows], indent=2))
        return 0
    if fmt == "names":
        for r in rows:
            print(r.name)
        return 0
    table = Table(title=title, show_lines=False)
    # one line per name where the terminal allows, so that 150+ names stay scannable (`optitrainer info
    # NAME` has the rest): the summary gives way first
    table.add_column("name", no_wrap=True)
    table.add_column("aliases", overflow="fold", min_width=10, max_width=24)
    table.add_column("modes / capabilities", overflow="fold", min_width=24, max_width=44)
    table.add_column("lr", no_wrap=True, min_width=4)
    table.add_column("provided by", overflow="fold", min_width=12, max_width=32)
    table.add_column("installed", overflow="fold", min_width=9, max_width=32)
    # piped to a file or a program: every summary whole (a terminal's width would cut them)
    piped = not console.is_terminal
    table.add_column(
        "summary", no_wrap=True, overflow="ellipsis", min_width=20, max_width=None if piped else 60
    )
    for r in rows:
        if r.error:
            table.add_row(r.name, "", "", "", str(r.provenance), "[red]broken[/red]", f"[red]{r.error}[/red]")
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
        lr = getattr(r, "recommended_lr", None)
        table.add_row(
            r.name,
            ", ".join(r.aliases),
            caps,
            f"{lr:g}" if lr else "",
            str(r.provenance),
            installed,
            r.summary,
        )
    console.print(table)
    dists = {r.provenance.distribution for r in rows}
    filtered = len(rows) != len(every)
    console.print(
        f"{len(rows)} of {len(every)} names from {len(dists)} distribution(s)"
        + ("" if filtered else "; narrow with --dist, --capability, --grep; --format json for scripts")
    )
    if engine is not None:
        console.print(
            f"Every other registered name is refused under {describe_engines(frozenset({engine}))} before step 1; "
            "`optitrainer info NAME` says why, `optitrainer matrix` shows every engine."
        )
        return 0
    for problem in REGISTRY.problems():  # names or aliases claimed twice, plugins that failed to load
        console.print(f"[yellow]warning:[/yellow] {problem}")
    if filtered:
        return 0
    registered = {r.name for r in rows} | {a for r in rows for a in r.aliases}
    missing = sorted({d for n, d in KNOWN_PLUGINS.items() if n not in registered})
    if missing:
        console.print("Plugins not installed: " + ", ".join(missing) + " (pip install <name>)")
    console.print(
        "Any other name transformers knows (e.g. adamw_anyprecision) still works through transformers' own handler."
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
    lr = getattr(spec, "recommended_lr", None)
    console.print(
        f"recommended learning rate: {lr:g}"
        if lr
        else "recommended learning rate: none declared (the conformance kit tries 1e-3, 1e-2, 1e-1)"
    )
    measured = getattr(spec, "learning_rate_range", None)
    if measured:
        console.print(
            f"learns at learning rates {measured[0]:g} to {measured[1]:g} (measured: optitrainer check "
            f"{spec.name} --measure-lr); the trainer warns outside",
            highlight=False,
        )
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


def _measure_lr(console: Console, names: list[str]) -> int:
    """Measure and print each name's ``learning_rate_range``; 1 if one does not learn where it starts."""
    import tempfile

    from .kit.learning import LONG_STEPS, LR_SWEEP, _run, measure_learning_rate_range
    from .testing import conformance_cases

    if not names:
        console.print("[red]give the optimizer names to measure[/red]")
        return 2
    status = 0
    for case in conformance_cases(names):
        if case.optim.endswith(LAYERWISE_SUFFIX):
            continue  # the same update as the standard form
        if case.skip or case.error:
            console.print(
                f"[yellow]{case.optim}: not measured: {case.skip or case.error}[/yellow]", highlight=False
            )
            continue
        spec = REGISTRY.resolve(case.optim, check_installed=False).spec
        with tempfile.TemporaryDirectory() as tmp:
            start = spec.recommended_lr or next(
                (lr for lr in LR_SWEEP if _run(case, f"{tmp}/sweep{lr:g}", lr, LONG_STEPS)[0]), None
            )
            if start is None:
                console.print(
                    f"[red]{case.optim}: learns at none of {LR_SWEEP}: nothing to measure from[/red]"
                )
                status = 1
                continue
            try:
                found = measure_learning_rate_range(case, tmp, start=start)
            except AssertionError as exc:
                console.print(f"[red]{exc}[/red]", highlight=False)
                status = 1
                continue
        missed = " nor ".join(f"{x:g}" for x in (found.failed_below, found.failed_above) if x is not None)
        console.print(
            f"{case.optim}: learns at learning_rate {found.low:g} to {found.high:g} ({found.steps} steps, "
            f"constant lr, the kit's tiny Llama){f'; not at {missed}' if missed else ''}\n"
            f"  declare: OptimizerSpec(..., {found.spec_line()})",
            highlight=False,
        )
    return status


def _check(console: Console, names: list[str], dist: str | None, every: bool, checks: str | None) -> int:
    """Run the conformance kit; print each result as it comes, then a summary; 1 on any failure."""
    import time

    from .kit import CHECK_NAMES, FAILED, NOT_RUNNABLE, PASSED, SKIPPED, plan_for, run_plan

    if not (names or dist or every):
        console.print("[red]give optimizer names, --dist DISTRIBUTION or --all[/red]")
        return 2
    wanted = [c.strip() for c in checks.split(",") if c.strip()] if checks else None
    unknown = [c for c in wanted or () if c not in (*CHECK_NAMES, "distributed")]
    if unknown:
        console.print(
            f"[red]unknown check(s) {unknown}; use {', '.join((*CHECK_NAMES, 'distributed'))}[/red]"
        )
        return 2
    try:
        items, left_out = plan_for(names or None, dist=dist, checks=wanted)
    except (OptiTrainerError, LookupError) as exc:
        console.print(f"[red]{exc}[/red]", soft_wrap=True, highlight=False)
        return 2
    style = {PASSED: "green", FAILED: "red", SKIPPED: "yellow", NOT_RUNNABLE: "yellow"}
    forms = sorted({i.case.optim for i in items})
    console.print(f"checking {len(forms)} form(s), {len(items)} (form, check) item(s)", highlight=False)
    for dist_name, out in left_out.items():
        console.print(
            f"{dist_name}: {len(out)} name(s) sampled out (OPTITRAINER_CHECK_ALL=1 checks them): {', '.join(out)}",
            soft_wrap=True,
            highlight=False,
        )
    started = time.monotonic()

    def show(result) -> None:
        color = style[result.status]
        console.print(
            f"[{color}]{result.status:>17}[/{color}]  {result.optim} {result.check}"
            + (f": {result.detail}" if result.detail else ""),
            soft_wrap=True,
            highlight=False,
        )

    results = run_plan(items, on_result=show)
    table = Table(title="optitrainer check")
    table.add_column("optim=", no_wrap=True)
    for status in (PASSED, FAILED, SKIPPED, NOT_RUNNABLE):
        table.add_column(status, justify="right")
    table.add_column("failed checks", overflow="fold")
    for form in forms:
        mine = [r for r in results if r.optim == form]
        counts = [sum(r.status == s for r in mine) for s in (PASSED, FAILED, SKIPPED, NOT_RUNNABLE)]
        bad = ", ".join(r.check for r in mine if r.failed)
        table.add_row(form, *(str(c) for c in counts), f"[red]{bad}[/red]" if bad else "")
    console.print(table)
    failed = [r for r in results if r.failed]
    console.print(
        f"{len(results)} result(s) in {time.monotonic() - started:.0f}s: {len(failed)} failed",
        highlight=False,
    )
    return 1 if failed else 0


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
    lst.add_argument("--dist", help="only the names of this distribution (e.g. optitrainer-optimi)")
    lst.add_argument("--capability", action="append", default=[], help=CAPABILITY_HELP)
    lst.add_argument(
        "--grep", help="only names whose name, aliases, summary or distribution contain this text"
    )
    lst.add_argument(
        "--format", choices=("table", "json", "names"), default="table", help="json: one object per name"
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
    chk = sub.add_parser(
        "check",
        help="run the conformance kit over installed optimizers (exit 1 on any failure)",
        description="Run the conformance kit (docs/plugins.md) over the given names, every name of a "
        "distribution, or every registered name (--all: large distributions are sampled unless "
        "OPTITRAINER_CHECK_ALL=1). Each check prints passed, failed (with the finding and the fix), "
        "skipped or not runnable here, with the reason.",
    )
    chk.add_argument(
        "names", nargs="*", help="optimizer names or aliases (their _layerwise forms are checked too)"
    )
    chk.add_argument("--dist", help="every name of this distribution")
    chk.add_argument("--all", action="store_true", help="every registered name (sampled; see above)")
    chk.add_argument(
        "--checks", help="comma-separated subset of the checks (e.g. learns,options,distributed)"
    )
    chk.add_argument(
        "--measure-lr",
        action="store_true",
        help="instead of checking: measure the learning rates at which each name learns (the learns "
        "check's criterion, walking a 1-2-5 grid from its recommended_lr) and print the "
        "learning_rate_range to declare",
    )
    sub.add_parser("bench", help="measure memory, speed and loss per optimizer (see `optitrainer bench -h`)")
    ns = parser.parse_args(argv)
    # a terminal keeps its width (at least 140); a pipe or a file gets lines as long as the rows
    console = Console(width=max(Console().width, 140)) if sys.stdout.isatty() else Console(width=1000)
    if ns.command == "list":
        return _list(
            console, ns.engine, dist=ns.dist, capabilities=ns.capability, grep=ns.grep, fmt=ns.format
        )
    if ns.command == "check" and ns.measure_lr:
        return _measure_lr(console, ns.names)
    if ns.command == "check":
        return _check(console, ns.names, ns.dist, ns.all, ns.checks)
    if ns.command == "matrix":
        return _matrix(console, ns.names, ns.markdown, ns.write)
    return _info(console, ns.name)


if __name__ == "__main__":
    raise SystemExit(main())
