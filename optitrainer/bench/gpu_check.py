"""``python -m optitrainer.bench.gpu_check``: the GPU proof in one call (``bash tools/gpu_check.sh``).

On the 1.1B Llama of ``examples/bench/llama-1b.json`` under bf16 autocast, in ONE process, every
optimizer of the seed guide trains a few steps from the same initial weights, under ``OptiTrainer``
and under plain ``transformers.Trainer`` where transformers knows the name; each row reports the median
step time and its ratio to transformers', the allocator peak against the analytic floor, the final loss
and what was verified (:mod:`optitrainer.bench.gpu_checks.verify`). Exactness rows compare the CUDA-only
paths with references (:mod:`optitrainer.bench.gpu_checks.exactness`). A deadline (default 7.5 min,
counted from the start of ``tools/gpu_check.sh``) keeps the whole under 8 minutes on one H100: rows left
when it passes are reported as not run, and the table is always written (``gpu-check.md`` and
``gpu-check.json`` in ``--out``, default ``$OUT`` or ``bench-results/gpu-check``).

Exit status: 0 when every judged row that ran passed its check and none was left for the budget; 1
otherwise; 2 when it cannot start (no CUDA without ``--dry-run``, an unknown name).

``--dry-run`` runs the very same code on the CPU with the tiny Llama, skipping only the rows whose
subject exists on CUDA only (bitsandbytes' 8-bit and paged states, 8-bit GaLore, upstream AdaLomo).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from .gpu_checks import table
from .gpu_checks.budget import Budget, RowInterrupted
from .gpu_checks.plan import Job, Settings, dry_run_settings, gpu_settings, plan
from .gpu_checks.table import CHECK_FAILED, FAILED, NOT_RUN, OK, SKIPPED_DRY, Row

__all__ = ["main"]

DEFAULT_OUT = "bench-results/gpu-check"
DEFAULT_BUDGET_S = 450.0
#: distributions whose versions the header names
VERSIONED = (
    "optitrainer",
    "torch",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "galore-torch",
    "apollo-torch",
    "lomo-optim",
    "schedulefree",
    "torch-optimi",
    "grokadamw",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m optitrainer.bench.gpu_check",
        description="Every seed-guide optimizer on a 1.1B Llama, one process, one table (needs CUDA; "
        "--dry-run: the same on the CPU with the tiny model).",
    )
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU with the tiny Llama")
    p.add_argument("--out", default=None, help=f"output directory (default: $OUT if set, else {DEFAULT_OUT})")
    p.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds for the whole check, counted from $GPU_CHECK_STARTED_AT (set by tools/gpu_check.sh) "
        f"or from now (default: {DEFAULT_BUDGET_S:.0f})",
    )
    p.add_argument("--only", default=None, help="comma-separated optimizer names: run only their rows")
    p.add_argument("--model", default=None, help="another model: tiny, 100m or a config.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = _parser().parse_args(argv)
    started_at = float(os.environ.get("GPU_CHECK_STARTED_AT") or time.time())
    import torch

    if not ns.dry_run and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device here (torch {torch.__version__}); this check needs a GPU. "
            "Pass --dry-run (make gpu-check-dry) to run the same code on the CPU with the tiny model.",
            file=sys.stderr,
        )
        return 2
    settings = dry_run_settings() if ns.dry_run else gpu_settings()
    if ns.model:
        settings = replace(settings, model=ns.model)
    console = Console() if sys.stdout.isatty() else Console(width=250)
    try:
        only = {n.strip() for n in ns.only.split(",") if n.strip()} if ns.only else None
        jobs = plan(settings, only)
    except (LookupError, ImportError, ValueError) as exc:  # optitrainer's errors subclass these
        console.print(f"gpu_check: {exc}", style="red", markup=False, highlight=False)
        return 2
    from .runner import _quiet

    _quiet()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(ns.out or os.environ.get("OUT") or DEFAULT_OUT)
    budget = Budget(ns.budget, started_at, settings.row_limit_s, settings.min_slot_s)
    meta = _meta(settings, argv, budget)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="optitrainer-gpu-check-") as workdir:
        ctx, error = _context(settings, workdir)
        if ctx is not None:
            meta["model"] = f"{settings.model} ({_count(ctx.source.n_params)} parameters)"
        for i, job in enumerate(jobs, start=1):
            row = _run(job, settings, ctx, error, budget)
            rows.append(row)
            console.print(
                f"[{i}/{len(jobs)}] {row.optim} [{row.trainer}] {row.status_text} "
                f"({row.seconds or 0:.1f} s; {budget.elapsed():.0f}/{budget.seconds:.0f} s)",
                highlight=False,
                markup=False,
            )
            meta["wall_s"] = budget.elapsed()
            table.write(out, meta, rows, "(running)")
    table.add_ratios(rows)
    meta["wall_s"] = budget.elapsed()
    verdict, code = _verdict(rows, jobs)
    table.print_table(console, meta, rows)
    md, js = table.write(out, meta, rows, verdict)
    console.print(verdict, highlight=False, markup=False)
    console.print(f"wrote {md} and {js}", highlight=False, markup=False)
    return code


def _context(settings: Settings, workdir: str):
    """The shared context (the model built once), or why it could not be made."""
    import torch

    from .gpu_checks.train import Context
    from .gpu_checks.weights import ModelSource

    try:
        return Context(
            settings, ModelSource(settings.model, torch.device(settings.device), settings.seed), workdir
        ), None
    except Exception as exc:
        traceback.print_exc()
        return None, _first_line(exc)


def _run(job: Job, settings: Settings, ctx, context_error: str | None, budget: Budget) -> Row:
    """One row: skipped (dry run, CUDA only), not run (budget), or run within its time limit."""
    row = Row(job.optim, job.trainer, status=OK, judged=job.judged)
    if job.cuda_only and settings.dry_run:
        row.status = SKIPPED_DRY
        return row
    if ctx is None:
        row.status, row.error = FAILED, f"the model could not be built: {context_error}"
        return row
    if not budget.can_start():
        row.status = NOT_RUN
        return row
    start = time.perf_counter()
    try:
        with budget.limit():
            if job.check is None:
                _train_row(ctx, job, row)
            else:
                _check_row(ctx, job, row)
    except RowInterrupted as exc:
        row.status = NOT_RUN if exc.reason == "time budget" else FAILED
        row.error = str(exc)
    except Exception as exc:
        row.status, row.error = FAILED, _first_line(exc)
        row.details["traceback"] = traceback.format_exc()[-4000:]
    finally:
        _release(ctx)
    row.seconds = time.perf_counter() - start
    budget.record(row.seconds)
    return row


def _train_row(ctx, job: Job, row: Row) -> None:
    from .gpu_checks.train import train_and_measure
    from .gpu_checks.verify import summary, training_findings

    m = train_and_measure(ctx, job)
    ok, row.check = summary(training_findings(m, job.contender))
    row.status = OK if ok else CHECK_FAILED
    median = m.median_step_s
    row.step_ms = median * 1e3 if median is not None else None
    row.peak_bytes, row.floor_bytes, row.final_loss = m.peak_bytes, m.floor_bytes, m.final_loss
    row.details.update(m.details, losses=m.losses, step_times_s=m.step_times_s, state=asdict(m.state))


def _check_row(ctx, job: Job, row: Row) -> None:
    from .gpu_checks.exactness import run_check
    from .gpu_checks.verify import summary

    outcome = run_check(ctx, job.check)
    ok, row.check = summary(outcome.findings)
    row.status = OK if ok else CHECK_FAILED
    row.details.update(outcome.details)


def _release(ctx) -> None:
    """Free what the row left (its model, trainer and optimizer) before the next row's peak is measured."""
    gc.collect()
    if ctx is not None and ctx.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _verdict(rows: list[Row], jobs: list[Job]) -> tuple[str, int]:
    """The closing line and the exit status."""
    assert len(rows) == len(jobs), "every planned row is reported"
    failed = [r for r in rows if r.judged and r.status in (FAILED, CHECK_FAILED)]
    late = [r for r in rows if r.status == NOT_RUN]
    baselines = [r for r in rows if not r.judged and r.status in (FAILED, CHECK_FAILED)]
    skipped = sum(r.status == SKIPPED_DRY for r in rows)
    notes = []
    if skipped:
        notes.append(f"{skipped} CUDA-only rows skipped in the dry run")
    if baselines:
        notes.append(
            "transformers baselines that failed (reported, not judged): "
            + ", ".join(r.optim for r in baselines)
        )
    if not failed and not late:
        return " ".join([f"PASS: all {len(rows) - skipped} rows that ran passed their checks."] + notes), 0
    parts = ["FAIL:"]
    if failed:
        parts.append(
            f"{len(failed)} rows failed: " + ", ".join(f"{r.optim} [{r.trainer}]" for r in failed) + "."
        )
    if late:
        names = ",".join(dict.fromkeys(r.optim for r in late))
        parts.append(f"{len(late)} rows not run for the time budget (rerun them: --only {names}).")
    return " ".join(parts + notes), 1


def _meta(settings: Settings, argv: list[str], budget: Budget) -> dict[str, Any]:
    import torch

    versions = {}
    for dist in VERSIONED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    if settings.device == "cuda":
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores), dry run"
    return {
        "title": "optitrainer GPU check" + (" (dry run)" if settings.dry_run else ""),
        "device": device,
        "model": settings.model,
        "precision": settings.precision,
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "warmup_steps": settings.warmup_steps,
        "timed_steps": settings.timed_steps,
        "versions": versions,
        "python": platform.python_version(),
        "command": os.environ.get("GPU_CHECK_COMMAND")
        or "python -m optitrainer.bench.gpu_check " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": budget.elapsed(),
        "budget_s": budget.seconds,
        "settings": asdict(settings),
    }


if __name__ == "__main__":
    sys.exit(main())
