"""Run each benchmark configuration in its own Python process, with a progress bar.

A fresh process per run gives each optimizer a clean peak (RSS, CUDA allocator) and keeps one
run's allocations, threads and imports from leaking into the next.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .runner import EVENT_PREFIX, RunConfig


def run_child(
    cfg: RunConfig,
    workdir: Path,
    stem: str,
    on_event: Callable[[dict[str, Any]], None] = lambda e: None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """``python -m optitrainer.bench._child`` for ``cfg``; returns its JSON result (or the failure)."""
    config_path = workdir / f"{stem}.config.json"
    result_path = workdir / f"{stem}.result.json"
    log_path = workdir / f"{stem}.log"
    config_path.write_text(json.dumps(asdict(cfg), indent=1))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "optitrainer.bench._child", "--config", str(config_path)]
    cmd += ["--json-out", str(result_path)]
    timed_out = threading.Event()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        timer = None
        if timeout:

            def kill() -> None:
                timed_out.set()
                proc.kill()

            timer = threading.Timer(timeout, kill)
            timer.start()
        try:
            for line in proc.stdout:
                if line.startswith(EVENT_PREFIX):
                    on_event(json.loads(line[len(EVENT_PREFIX) :]))
                else:
                    log.write(line)
            proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
    if result_path.exists():
        return json.loads(result_path.read_text())
    tail = log_path.read_text().strip().splitlines()[-3:]
    why = f"timed out after {timeout:g} s" if timed_out.is_set() else f"exited with code {proc.returncode}"
    return {
        "optim": cfg.optim,
        "trainer": cfg.trainer,
        "trainer_optim": cfg.trainer_optim,
        "ok": False,
        "config": asdict(cfg),
        "error": f"the run {why} ({log_path}): " + " | ".join(tail),
    }


def run_all(
    configs: list[RunConfig], workdir: Path, console: Console, timeout: float | None = None
) -> list[dict[str, Any]]:
    """Every configuration in turn, one process each, under a progress bar; results in order."""
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # few refreshes: the parent must not take CPU time from the run it is measuring
    with Progress(*columns, console=console, transient=True, refresh_per_second=2) as progress:
        overall = progress.add_task("runs", total=len(configs))
        for i, cfg in enumerate(configs):
            label = cfg.label + (f" #{cfg.repeat + 1}" if cfg.repeat else "")
            task = progress.add_task(f"  {escape(label)}: starting", total=cfg.steps + cfg.mem_steps)

            def on_event(event: dict[str, Any], task=task, label=label) -> None:
                if event["event"] == "phase":
                    progress.update(task, description=f"  {escape(label)}: {event['phase']}")
                elif event["event"] == "step":
                    progress.advance(task)

            stem = f"{i:02d}-{cfg.optim}-{cfg.trainer}-{cfg.repeat}"
            result = run_child(cfg, workdir, stem, on_event, timeout)
            progress.remove_task(task)
            progress.advance(overall)
            status = (
                "[green]ok[/green]"
                if result.get("ok")
                else f"[red]failed[/red]: {escape(str(result.get('error')))}"
            )
            console.print(f"{escape(label)}: {status}")
            results.append(result)
    return results
