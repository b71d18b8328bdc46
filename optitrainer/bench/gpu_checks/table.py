"""The check's rows and how they are shown: a terminal table, ``gpu-check.md`` and ``gpu-check.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..report import human_bytes
from .plan import OPTITRAINER, TRANSFORMERS

OK = "ok"
FAILED = "failed"
CHECK_FAILED = "check failed"
SKIPPED_DRY = "needs CUDA: skipped in dry run"
NOT_RUN = "not run: time budget"

COLUMNS = (
    "optimizer",
    "trainer",
    "status",
    "step ms",
    "x transformers",
    "peak",
    "floor",
    "peak/floor",
    "final loss",
    "check",
)

#: what each column means (docs/benchmarks.md and the Markdown file say the same)
LEGEND = (
    "step ms: median wall time of the timed steps (after the warm-up); x transformers: that over "
    "transformers.Trainer's for the same name; peak: torch.cuda.max_memory_allocated during the run "
    "(dry run: the exact live-tensor peak); floor: weights + optimizer state + the gradients the method "
    "needs alive at once (all, or the largest one for layerwise and fused-backward methods); check: what "
    "was verified. transformers rows are baselines: reported, not judged."
)


@dataclass
class Row:
    """One line of the table."""

    optim: str
    trainer: str
    status: str
    check: str = ""
    judged: bool = True  # decides the exit code (not the transformers baselines)
    error: str | None = None  # the exception's first line
    step_ms: float | None = None
    ratio: float | None = None
    peak_bytes: int | None = None
    floor_bytes: int | None = None
    final_loss: float | None = None
    seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_over_floor(self) -> float | None:
        if self.peak_bytes is None or not self.floor_bytes:
            return None
        return self.peak_bytes / self.floor_bytes

    @property
    def status_text(self) -> str:
        return f"{self.status}: {self.error}" if self.error else self.status

    @property
    def passed(self) -> bool:
        return self.status in (OK, SKIPPED_DRY)


def add_ratios(rows: list[Row]) -> None:
    """Each optitrainer row's median step time over transformers.Trainer's for the same name."""
    baselines = {r.optim: r for r in rows if r.trainer == TRANSFORMERS and r.step_ms}
    for r in rows:
        base = baselines.get(r.optim)
        if r.trainer == OPTITRAINER and r.step_ms and base is not None:
            r.ratio = r.step_ms / base.step_ms


def _size(n: int | None) -> str:
    return f"{n / 2**30:.2f} GiB" if n is not None and n >= 2**30 else human_bytes(n)


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def cells(r: Row) -> list[str]:
    return [
        r.optim,
        r.trainer,
        r.status_text,
        _num(r.step_ms, ".1f"),
        _num(r.ratio, ".3f"),
        _size(r.peak_bytes) if r.peak_bytes is not None else "-",
        _size(r.floor_bytes) if r.floor_bytes is not None else "-",
        _num(r.peak_over_floor, ".3f"),
        _num(r.final_loss, ".4f"),
        r.check,
    ]


def header_lines(meta: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    return [
        f"device: {meta['device']}",
        f"model: {meta['model']}; {meta['precision']}; batch {meta['batch_size']} x {meta['seq_len']} tokens; "
        f"{meta['warmup_steps']} warm-up + {meta['timed_steps']} timed steps per run",
        f"versions: {versions}",
        f"command: `{meta['command']}`",
        f"date: {meta['date']}; wall time {meta['wall_s']:.0f} s (budget {meta['budget_s']:.0f} s)",
    ]


def markdown(meta: dict[str, Any], rows: list[Row], verdict: str) -> str:
    lines = [f"# {meta['title']}", ""]
    lines += [f"- {line}" for line in header_lines(meta)]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |")
    lines += ["", verdict, "", LEGEND, ""]
    return "\n".join(lines)


def print_table(console: Console, meta: dict[str, Any], rows: list[Row]) -> None:
    table = Table(title=meta["title"], caption="\n".join(header_lines(meta)), show_lines=False)
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="right" if 3 <= i <= 8 else "left", overflow="fold")
    for r in rows:
        style = None if r.passed else ("yellow" if r.status == NOT_RUN or not r.judged else "red")
        table.add_row(*(Text(c) for c in cells(r)), style=style)  # error texts may hold [brackets]
    console.print(table)


def write(out: Path, meta: dict[str, Any], rows: list[Row], verdict: str) -> tuple[Path, Path]:
    """``gpu-check.md`` and ``gpu-check.json`` in ``out`` (rewritten after every row, so a killed run leaves them)."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "gpu-check.md", out / "gpu-check.json"
    md.write_text(markdown(meta, rows, verdict))
    payload = {"meta": meta, "verdict": verdict, "rows": [dict(asdict(r), passed=r.passed) for r in rows]}
    js.write_text(json.dumps(payload, indent=1, default=str))
    return md, js
