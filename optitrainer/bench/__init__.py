"""``optitrainer bench``: what each optimizer costs in memory, speed and loss, on your model.

Each optimizer runs in its own process (:mod:`optitrainer.bench.runner`), optionally next to the
same optimizer under plain ``transformers.Trainer``; the results go to a terminal table and to
``results.json``, ``results.csv``, ``results.md`` and ``bench.png`` in ``--out``. See
``docs/benchmarks.md`` for how each figure is measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from . import memory, report
from .models import PRESETS
from .runner import RunConfig
from .spawn import run_all

__all__ = ["main", "plan"]

#: transformers-built optimizers (no plugin installed) that need ``optim_target_modules``
_TRANSFORMERS_TARGETED = ("galore_", "apollo_")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="optitrainer bench",
        description="Measure memory, speed and loss per optimizer, each in its own process.",
        epilog="Example: optitrainer bench --optim adamw_torch,adamw_torch_layerwise,lomo --baseline transformers",
    )
    p.add_argument("--optim", default=None, help="comma-separated optimizer names (see `optitrainer list`)")
    p.add_argument(
        "--model",
        default="tiny",
        help=f"{' | '.join(PRESETS)} | a config.json | a local checkpoint directory (default: tiny)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run (default: 20)")
    p.add_argument(
        "--warmup-steps", type=int, default=2, help="first steps left out of the median (default: 2)"
    )
    p.add_argument(
        "--mem-steps",
        type=int,
        default=3,
        help="steps of the separate, memory-tracked phase; 0 skips it (default: 3)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="per-device batch size (default: 4)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default: 32)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=0.0,
        help="gradient clipping (default: 0, so both trainers do the same work; see docs/benchmarks.md)",
    )
    p.add_argument("--optim-args", default=None, help="optim_args for every optimizer, e.g. 'rank=16'")
    p.add_argument(
        "--optim-args-for",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "ARGS"),
        help="optim_args for one optimizer (repeatable)",
    )
    p.add_argument(
        "--target-modules",
        default="all-linear",
        help="optim_target_modules for optimizers that need them, e.g. GaLore/APOLLO (default: all-linear)",
    )
    p.add_argument(
        "--baseline",
        choices=("none", "transformers"),
        default="none",
        help="also run each optimizer under plain transformers.Trainer and report the ratios",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed runs per (optimizer, trainer), interleaved")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="seconds before a run is killed")
    p.add_argument("--out", default="bench-results", help="output directory (default: bench-results)")
    p.add_argument(
        "--clip-cost",
        action="store_true",
        help="instead: what exact clipping costs, per optimizer: a run clipped at --max-grad-norm (1 if 0) "
        "and an unclipped run stepping in turn in one process; prints their step-time ratio",
    )
    p.add_argument(
        "--ddp",
        type=int,
        default=0,
        metavar="N",
        help="instead: one torchrun launch of N ranks (gloo on CPU; NCCL, one GPU per rank, with --device cuda "
        "or auto on a machine with N GPUs) and one of a single process, the contenders "
        "(--optim name[:max_grad_norm],...; default adamw_torch, adamw_torch_layerwise, lomo, "
        "adamw_torch_layerwise:1) stepping in turn in each rank; prints ratios to the first and "
        "communication alone",
    )
    p.add_argument(
        "--bucket-cap-mb",
        type=float,
        default=25.0,
        help="with --ddp: the bucket size of the communication-alone measurement (default: DDP's 25)",
    )
    return p


def transformers_name(resolved: Any) -> str | None:
    """The name ``transformers.Trainer`` knows for the same optimizer and mode, if it knows one."""
    from ..transformers_fallback import transformers_optimizer_names

    name = resolved.spec.transformers_name
    if name and resolved.layerwise:
        name += "_layerwise"
    return name if name in transformers_optimizer_names() else None


def plan(ns: argparse.Namespace) -> tuple[list[RunConfig], list[dict[str, Any]]]:
    """The runs to make, and the baseline rows that cannot run (transformers has no such name).

    Resolves every name first, so a typo fails before anything runs.
    """
    from ..registry import REGISTRY

    per_optim = dict(ns.optim_args_for)
    names = list(dict.fromkeys(n.strip() for n in ns.optim.split(",") if n.strip()))
    if not names:
        raise ValueError("--optim: give at least one optimizer name")
    device, no_cuda = ns.device, None
    if device == "auto" or device.startswith("cuda"):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif not torch.cuda.is_available():
            # refused once the names are checked, before a child builds the model (a 1B model per run)
            no_cuda = (
                f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); run on a "
                "GPU machine with a CUDA build of torch, or pass --device cpu"
            )
    common = {
        "model": ns.model,
        "steps": ns.steps,
        "warmup_steps": ns.warmup_steps,
        "batch_size": ns.batch_size,
        "seq_len": ns.seq_len,
        "grad_accum": ns.grad_accum,
        "lr": ns.lr,
        "max_grad_norm": ns.max_grad_norm,
        "dtype": ns.dtype,
        "device": device,
        "seed": ns.seed,
        "threads": ns.threads,
    }
    pairs, skipped = [], []
    names_order: dict[str, int] = {}
    for name in names:
        resolved = REGISTRY.resolve(name)
        caps = resolved.spec.capabilities
        targeted = caps.needs_target_modules or (
            resolved.is_transformers_fallback and resolved.name.startswith(_TRANSFORMERS_TARGETED)
        )
        names_order.setdefault(resolved.name, len(names_order))
        grad_rule = memory.GRADS_LARGEST if resolved.layerwise or caps.owns_backward else memory.GRADS_ALL
        base = dict(
            common,
            optim=resolved.name,
            grad_rule=grad_rule,
            optim_args=per_optim.get(name, per_optim.get(resolved.name, ns.optim_args)),
            target_modules=ns.target_modules if targeted else None,
        )
        pairs.append(dict(base, trainer="optitrainer", trainer_optim=resolved.name))
        if ns.baseline == "transformers":
            hf = transformers_name(resolved)
            if hf is None:
                skipped.append(
                    {
                        "optim": resolved.name,
                        "trainer": "transformers",
                        "trainer_optim": None,
                        "ok": False,
                        "skipped": True,
                        "error": "transformers.Trainer has no optimizer of this name",
                    }
                )
            else:
                pairs.append(dict(base, trainer="transformers", trainer_optim=hf))
    if no_cuda is not None:
        raise ValueError(no_cuda)
    configs = []
    for r in range(max(ns.repeats, 1)):
        # odd repeats run transformers first: neither trainer always inherits the other's warm caches
        order = (
            pairs
            if r % 2 == 0
            else sorted(pairs, key=lambda kw: (names_order[kw["optim"]], kw["trainer"] == "optitrainer"))
        )
        configs += [RunConfig(**dict(kw, repeat=r, mem_steps=ns.mem_steps if r == 0 else 0)) for kw in order]
    return configs, skipped


def merge_repeats(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (optimizer, trainer): memory and losses from the first run, step times pooled."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["optim"], r["trainer"]), []).append(r)
    merged = []
    for runs in groups.values():
        first, ok = runs[0], [r for r in runs if r.get("ok")]
        if first.get("ok") and len(runs) > 1:
            t = first["timing"]
            pooled = [s for r in ok for s in r["timing"]["step_times_s"][r["timing"]["warmup_steps"] :]]
            t["repeat_medians_s"] = [r["timing"]["median_step_s"] for r in ok]
            t["median_step_s"] = statistics.median(pooled)
            t["tokens_per_s"] = t["tokens_per_step"] / t["median_step_s"]
            t["repeats_ok"] = len(ok)
        merged.append(first)
    return merged


def _meta(ns: argparse.Namespace, argv: Sequence[str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("ok")]
    model = ok[0]["model"] if ok else {"spec": ns.model}
    n = model.get("n_params")
    versions = {}
    for dist in ("optitrainer", "torch", "transformers", "accelerate"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "command": "optitrainer bench " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "model_label": f"{ns.model} ({n / 1e6:.2f}M params)" if n else ns.model,
        "device": ok[0]["config"]["device"] if ok else ns.device,
        "torch_threads": ok[0].get("torch_threads") if ok else None,
        "batch_size": ns.batch_size,
        "seq_len": ns.seq_len,
        "grad_accum": ns.grad_accum,
        "steps": ns.steps,
        "warmup_steps": ns.warmup_steps,
        "mem_steps": ns.mem_steps,
        "repeats": ns.repeats,
        "lr": ns.lr,
        "max_grad_norm": ns.max_grad_norm,
        "dtype": ns.dtype,
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.ddp:
        from . import ddp

        if ns.ddp < 2:
            parser.error("--ddp N: N >= 2 ranks")
        return ddp.main(ns)
    if not ns.optim:
        parser.error("the following arguments are required: --optim")
    if ns.clip_cost:
        return _clip_cost(ns)
    # a terminal keeps its width; a file or pipe gets the whole table on one line per row
    console = Console() if sys.stdout.isatty() else Console(width=220)
    try:
        configs, skipped = plan(ns)
    except (LookupError, ImportError, ValueError, TypeError) as exc:  # optitrainer's errors subclass these
        console.print(f"[red]optitrainer bench: {exc}[/red]")
        return 2
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    results = merge_repeats(run_all(configs, out / "runs", console, timeout=ns.timeout))
    runs = _in_order(results + skipped)
    summary = report.summarize(runs, _meta(ns, argv, runs))
    report.print_table(console, summary)
    written = [
        report.write_json(summary, out / "results.json"),
        report.write_csv(summary, out / "results.csv"),
        report.write_markdown(summary, out / "results.md"),
    ]
    png = report.write_png(summary, out / "bench.png")
    if png is None:
        console.print(
            "[yellow]no PNG: matplotlib is not installed (pip install 'optitrainer[bench]')[/yellow]"
        )
    else:
        written.append(png)
    console.print("wrote " + ", ".join(str(p) for p in written))
    failed = [r for r in runs if r["trainer"] == "optitrainer" and not r.get("ok")]
    return 1 if failed else 0


def _clip_cost(ns: argparse.Namespace) -> int:
    """``--clip-cost``: the same-process comparison of :mod:`optitrainer.bench.clipcost`."""
    from . import clipcost

    if (
        ns.device not in ("auto", "cpu")
        or ns.dtype != "float32"
        or ns.grad_accum != 1
        or ns.baseline != "none"
    ):
        print("optitrainer bench --clip-cost: runs float32 on the CPU, without accumulation or a baseline")
        return 2
    argv = ["--optim", ns.optim, "--model", ns.model, "--max-grad-norm", str(ns.max_grad_norm or 1.0)]
    argv += ["--steps", str(ns.steps), "--warmup-steps", str(ns.warmup_steps)]
    argv += ["--batch-size", str(ns.batch_size), "--seq-len", str(ns.seq_len), "--lr", str(ns.lr)]
    argv += ["--threads", str(ns.threads or 1), "--seed", str(ns.seed), "--target-modules", ns.target_modules]
    return clipcost.main(argv)


def _in_order(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = list(dict.fromkeys(r["optim"] for r in runs))
    return sorted(runs, key=lambda r: (order.index(r["optim"]), r["trainer"] != "optitrainer"))
