"""The benchmark's outputs: comparisons and targets, a terminal table, JSON, CSV and a PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

#: OptiTrainer / transformers.Trainer, same optimizer: the most each ratio may be
MAX_TIME_RATIO = 1.02
MAX_MEMORY_RATIO = 1.00
#: layerwise and fused-backward methods: the most their peak may exceed the analytic floor
MAX_PEAK_OVER_FLOOR = 1.10


def summarize(runs: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything written to ``results.json``: the runs, OptiTrainer-vs-transformers ratios, targets."""
    by_key = {(r["optim"], r["trainer"]): r for r in runs}
    comparisons = []
    for optim in dict.fromkeys(r["optim"] for r in runs):
        ours, theirs = by_key.get((optim, "optitrainer")), by_key.get((optim, "transformers"))
        if not (ours and theirs and ours.get("ok") and theirs.get("ok")):
            continue
        comparisons.append(
            {
                "optim": optim,
                "transformers_optim": theirs["trainer_optim"],
                "time_ratio": _ratio(
                    _get(ours, "timing", "median_step_s"), _get(theirs, "timing", "median_step_s")
                ),
                "memory_ratio": _ratio(
                    _get(ours, "memory", "peak_bytes"), _get(theirs, "memory", "peak_bytes")
                ),
                "final_loss_diff": _diff(ours.get("final_loss"), theirs.get("final_loss")),
                "repeat_spread": _max(_spread(ours), _spread(theirs)),
            }
        )
    calibrate_rss(runs)
    return {"meta": meta, "runs": runs, "comparisons": comparisons, "targets": targets(runs, comparisons)}


def calibrate_rss(runs: list[dict[str, Any]]) -> None:
    """Add ``rss_over_floor`` to each run when a plain ``sgd`` run of the same trainer is among them.

    The resident set holds more than tensors (libraries, Python, the allocator's slack). Plain SGD has
    no state and no temporaries, and its floor (weights + every gradient) is its tracked peak, so its
    RSS delta minus its floor is that overhead; each run's RSS delta minus it, over the run's floor, is
    the resident-memory counterpart of peak/floor (fragmentation shows up here, not in the tracker).
    """
    overhead = {
        r["trainer"]: r["memory"]["rss_delta_bytes"] - r["floor"]["total"]
        for r in runs
        if r["optim"] == "sgd" and r.get("ok") and _get(r, "memory", "rss_delta_bytes") is not None
    }
    for r in runs:
        base, rss = overhead.get(r["trainer"]), _get(r, "memory", "rss_delta_bytes")
        if r.get("ok") and base is not None and rss is not None and _get(r, "floor", "total"):
            r["rss_over_floor"] = (rss - base) / r["floor"]["total"]


def targets(runs: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and whether it holds."""
    out = []
    for c in comparisons:
        for key, limit in (("time_ratio", MAX_TIME_RATIO), ("memory_ratio", MAX_MEMORY_RATIO)):
            if c[key] is not None:
                out.append(_check(c["optim"], f"{key} vs transformers", c[key], limit))
    for r in runs:
        if not r.get("ok") or r["trainer"] != "optitrainer" or r["config"]["grad_rule"] != "largest":
            continue
        if r.get("max_grads_over_largest_param") is not None:
            out.append(
                _check(r["optim"], "max grad bytes / largest param", r["max_grads_over_largest_param"], 1.0)
            )
        if r.get("rss_over_floor") is not None:
            out.append(
                _check(r["optim"], "RSS / floor (sgd-calibrated)", r["rss_over_floor"], MAX_PEAK_OVER_FLOOR)
            )
        if r.get("peak_over_floor") is not None:
            check = _check(r["optim"], "peak / floor", r["peak_over_floor"], MAX_PEAK_OVER_FLOOR)
            bd = r["memory"].get("breakdown_at_peak") or {}
            if bd.get("total"):
                # the floor leaves activations out: say how much of the peak they (and temporaries) are
                check["note"] = f"other = {bd['other'] / bd['total']:.0%} of the peak"
            out.append(check)
    return out


def _check(optim: str, what: str, value: float, limit: float) -> dict[str, Any]:
    return {"optim": optim, "check": what, "value": value, "limit": limit, "ok": value <= limit}


def _spread(run: dict[str, Any]) -> float | None:
    """Largest / smallest median step time over the repeats of one run: how noisy the machine is."""
    medians = [m for m in _get(run, "timing", "repeat_medians_s") or [] if m]
    return max(medians) / min(medians) if len(medians) > 1 else None


def _max(*xs: float | None) -> float | None:
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def _get(run: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        run = (run or {}).get(k)
    return run


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# --- terminal ---------------------------------------------------------------------------------------


def print_table(console: Console, summary: dict[str, Any]) -> None:
    meta = summary["meta"]
    title = (
        f"optitrainer bench: {meta['model_label']}, batch {meta['batch_size']} x seq {meta['seq_len']}, "
        f"{meta['device']}"
    )
    table = Table(title=title, show_lines=False)
    for col in (
        "optimizer",
        "trainer",
        "step ms",
        "tok/s",
        "final loss",
        "peak",
        "params",
        "grads@peak",
        "state",
        "other",
        "max grads",
        "floor",
        "peak/floor",
        "RSS Δ",
        "RSS/floor",
    ):
        left = col in ("optimizer", "trainer")
        table.add_column(col, justify="left" if left else "right", no_wrap=left)
    notes = []
    for r in summary["runs"]:
        if not r.get("ok"):
            what = "n/a" if r.get("skipped") else "[red]failed[/red]"
            table.add_row(r["optim"], r["trainer"], what)
            notes.append(f"{r['optim']} [{r['trainer']}]: {r.get('error', 'failed')}")
            continue
        table.add_row(
            *_run_cells(r, ratio_fmt=".2f"),
            human_bytes(r["memory"].get("rss_delta_bytes")),
            _fmt(r.get("rss_over_floor"), ".2f"),
        )
    console.print(table)
    for note in notes:
        console.print(f"  {note}", markup=False)
    if summary["comparisons"]:
        cmp = Table(title="OptiTrainer / transformers.Trainer, same optimizer")
        for col in (
            "optimizer",
            "transformers name",
            "step-time ratio",
            "peak-memory ratio",
            "final-loss diff",
            "repeat spread",
        ):
            cmp.add_column(col, justify="left" if col in ("optimizer", "transformers name") else "right")
        for c in summary["comparisons"]:
            cmp.add_row(
                c["optim"],
                c["transformers_optim"],
                _mark(c["time_ratio"], MAX_TIME_RATIO),
                _mark(c["memory_ratio"], MAX_MEMORY_RATIO),
                _fmt(c["final_loss_diff"], "+.2e"),
                _fmt(c.get("repeat_spread"), ".3f"),
            )
        console.print(cmp)
        if any(c.get("repeat_spread") for c in summary["comparisons"]):
            console.print(
                "repeat spread: slowest / fastest median step time over the --repeats of one trainer; "
                "a step-time ratio closer to 1 than that is within the machine's noise"
            )
    failed = [t for t in summary["targets"] if not t["ok"]]
    if failed:
        console.print("[yellow]targets missed[/yellow] (docs/benchmarks.md explains each figure):")
        for t in failed:
            note = f" ({t['note']})" if t.get("note") else ""
            console.print(
                f"  {t['optim']}: {t['check']} = {t['value']:.3f} > {t['limit']:g}{note}", markup=False
            )


def _mark(value: float | None, limit: float) -> str:
    if value is None:
        return "-"
    colour = "green" if value <= limit else "yellow"
    return f"[{colour}]{value:.3f}[/{colour}]"


# --- files ------------------------------------------------------------------------------------------

CSV_FIELDS = (
    "optim",
    "trainer",
    "trainer_optim",
    "ok",
    "error",
    "median_step_s",
    "tokens_per_s",
    "final_loss",
    "peak_bytes",
    "peak_source",
    "params_bytes",
    "grads_at_peak_bytes",
    "optimizer_state_at_peak_bytes",
    "other_at_peak_bytes",
    "max_grad_bytes_alive",
    "optimizer_state_bytes_end",
    "floor_bytes",
    "floor_grad_rule",
    "peak_over_floor",
    "largest_param_bytes",
    "rss_peak_bytes",
    "rss_delta_bytes",
    "rss_over_floor",
    "time_ratio_vs_transformers",
    "memory_ratio_vs_transformers",
)


def csv_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    ratios = {c["optim"]: c for c in summary["comparisons"]}
    rows = []
    for r in summary["runs"]:
        row = {k: r.get(k) for k in ("optim", "trainer", "trainer_optim", "ok", "error", "final_loss")}
        if r.get("ok"):
            mem, bd = r["memory"], r["memory"].get("breakdown_at_peak") or {}
            row.update(
                median_step_s=r["timing"]["median_step_s"],
                tokens_per_s=r["timing"]["tokens_per_s"],
                peak_bytes=mem["peak_bytes"],
                peak_source=mem["peak_source"],
                params_bytes=bd.get("params"),
                grads_at_peak_bytes=bd.get("grads"),
                optimizer_state_at_peak_bytes=bd.get("optimizer_state"),
                other_at_peak_bytes=bd.get("other"),
                max_grad_bytes_alive=mem.get("max_grad_bytes_alive"),
                optimizer_state_bytes_end=mem["optimizer_state_bytes_end"],
                floor_bytes=r["floor"]["total"],
                floor_grad_rule=r["floor"]["grad_rule"],
                peak_over_floor=r.get("peak_over_floor"),
                largest_param_bytes=r["model"]["largest_param_bytes"],
                rss_peak_bytes=mem["rss_peak_bytes"],
                rss_delta_bytes=mem["rss_delta_bytes"],
                rss_over_floor=r.get("rss_over_floor"),
            )
        if r["trainer"] == "optitrainer" and r["optim"] in ratios:
            row["time_ratio_vs_transformers"] = ratios[r["optim"]]["time_ratio"]
            row["memory_ratio_vs_transformers"] = ratios[r["optim"]]["memory_ratio"]
        rows.append(row)
    return rows


def write_json(summary: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return path


def write_csv(summary: dict[str, Any], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(csv_rows(summary))
    return path


def _run_cells(r: dict[str, Any], ratio_fmt: str) -> list[str]:
    """The per-run cells shared by the terminal table and ``results.md`` (everything up to peak/floor)."""
    mem, bd = r["memory"], r["memory"].get("breakdown_at_peak") or {}
    median = r["timing"]["median_step_s"]
    return [
        r["optim"],
        r["trainer"],
        _fmt(median * 1e3 if median else None, ".1f"),
        _fmt(r["timing"]["tokens_per_s"], ".0f"),
        _fmt(r.get("final_loss"), ".4f"),
        human_bytes(mem["peak_bytes"]),
        human_bytes(bd.get("params")),
        human_bytes(bd.get("grads")),
        human_bytes(bd.get("optimizer_state")),
        human_bytes(bd.get("other")),
        human_bytes(mem.get("max_grad_bytes_alive")),
        human_bytes(r["floor"]["total"]),
        _fmt(r.get("peak_over_floor"), ratio_fmt),
    ]


def markdown(summary: dict[str, Any]) -> str:
    """The tables as Markdown (``results.md``), with the command that produced them."""
    meta = summary["meta"]
    lines = [f"`{meta['command']}`", ""]
    lines.append(
        f"{meta['model_label']}, batch {meta['batch_size']} x seq {meta['seq_len']}, {meta['device']} "
        f"({meta.get('torch_threads')} torch threads), {meta['steps']} timed steps x {meta['repeats']} repeat(s)"
    )
    lines += [
        "",
        "| optimizer | trainer | step ms | tok/s | final loss | peak | params | grads@peak | state | other "
        "| max grads | floor | peak/floor | RSS Δ | RSS/floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["runs"]:
        if not r.get("ok"):
            why = "n/a" if r.get("skipped") else "failed"
            lines.append(f"| {r['optim']} | {r['trainer']} | {why}: {r.get('error', '')} |" + " |" * 12)
            continue
        rss = [human_bytes(r["memory"].get("rss_delta_bytes")), _fmt(r.get("rss_over_floor"), ".3f")]
        lines.append("| " + " | ".join([*_run_cells(r, ratio_fmt=".3f"), *rss]) + " |")
    if summary["comparisons"]:
        lines += [
            "",
            "| optimizer | step-time ratio | peak-memory ratio | final-loss diff | repeat spread |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in summary["comparisons"]:
            lines.append(
                f"| {c['optim']} | {_fmt(c['time_ratio'], '.3f')} | {_fmt(c['memory_ratio'], '.3f')} "
                f"| {_fmt(c['final_loss_diff'], '+.2e')} | {_fmt(c.get('repeat_spread'), '.3f')} |"
            )
    return "\n".join(lines) + "\n"


def write_markdown(summary: dict[str, Any], path: Path) -> Path:
    path.write_text(markdown(summary))
    return path


def write_png(summary: dict[str, Any], path: Path) -> Path | None:
    """Loss curves and stacked memory bars (with the floor marked); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for r in summary["runs"] if r.get("ok")]
    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [1, 1.3]})
    for r in runs:
        style = "-" if r["trainer"] == "optitrainer" else "--"
        ax_loss.plot(range(1, len(r["losses"]) + 1), r["losses"], style, label=_label(r))
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", title="loss")
    ax_loss.legend(fontsize=7)
    mems = [r for r in runs if r["memory"].get("breakdown_at_peak")]
    scale, unit = _unit(max([r["memory"]["peak_bytes"] or 0 for r in mems] + [1]))
    bottoms = [0.0] * len(mems)
    colours = {"params": "#4C72B0", "grads": "#DD8452", "optimizer_state": "#55A868", "other": "#8C8C8C"}
    for role, colour in colours.items():
        heights = [r["memory"]["breakdown_at_peak"][role] / scale for r in mems]
        ax_mem.bar(range(len(mems)), heights, bottom=bottoms, color=colour, label=role)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, r in enumerate(mems):
        ax_mem.hlines(r["floor"]["total"] / scale, i - 0.4, i + 0.4, colors="black", linewidth=2)
    ax_mem.plot([], [], color="black", linewidth=2, label="analytic floor")
    ax_mem.set_xticks(
        range(len(mems)), [_label(r).replace(" [", "\n[") for r in mems], fontsize=7, rotation=30
    )
    ax_mem.set(ylabel=unit, title="live tensor bytes at the peak")
    ax_mem.legend(fontsize=7)
    meta = summary["meta"]
    fig.suptitle(
        f"{meta['model_label']}, batch {meta['batch_size']} x seq {meta['seq_len']}, {meta['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(r: dict[str, Any]) -> str:
    return f"{r['optim']} [{r['trainer']}]"


def _unit(n: float) -> tuple[float, str]:
    for scale, unit in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= scale:
            return float(scale), unit
    return 1.0, "bytes"
