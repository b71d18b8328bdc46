"""Run the conformance kit over every candidate of the table; write ``tools/sweep_results.json``.

    .venv/bin/python plugins/optitrainer-pytorch-optimizer/tools/sweep.py [--workers N] [NAME ...]
    .venv/bin/python plugins/optitrainer-pytorch-optimizer/tools/sweep.py --layerwise-forms [--workers N]
    .venv/bin/python plugins/optitrainer-pytorch-optimizer/tools/sweep.py --kit [--workers N] [NAME ...]

Each candidate (every row of the table ``generate_table.py --candidates`` writes, layerwise or not) is
registered in this process with ``layerwise=True`` so that ``check_layerwise_matches_standard`` can try
its ``_layerwise`` form; then ``check_resume``, ``check_scheduled_lr_reaches_update``,
``check_refusals`` (and the kit's ``check_learns`` where it exists) run on the standard form. The
verdicts feed ``generate_table.py``: a failing check excludes the name, a passing exactness check
(outside ``GLOBAL_STATE``) makes it layerwise. ``--layerwise-forms`` then runs the kit on the
``_layerwise`` forms the table declares; a failure there takes the form back out (regenerate after each
pass). ``--kit`` runs the kit's later checks, ``learns`` and ``options``, on every name of the table as
installed (what ``optitrainer check NAME --checks learns,options`` runs) and records ``kit_learns`` and
``kit_options`` ("pass: <finding>" or "fail: <finding>"). Names are interleaved over ``--workers`` processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "sweep_results.json"


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def check_one(key: str) -> dict:
    """Every kit check on ``po_<key>`` (standard form) and its ``_layerwise`` exactness."""
    from optitrainer_pytorch_optimizer import ROWS, spec_from_row

    import optitrainer
    from optitrainer import testing

    row = next(r for r in ROWS if r.upstream == key)
    optitrainer.register(spec_from_row(row, layerwise=True), replace=True)
    (case,) = [c for c in testing.conformance_cases([row.name]) if c.optim == row.name]
    out: dict = {"name": row.name}
    checks = [
        ("refusals", lambda d: testing.check_refusals(case)),
        ("scheduled_lr", lambda d: testing.check_scheduled_lr_reaches_update(case, d)),
        ("resume", lambda d: testing.check_resume(case, d)),
    ]
    if hasattr(testing, "check_learns"):
        checks.append(("learns", lambda d: testing.check_learns(case, d)))
    lw = testing.ConformanceCase(row.name + "_layerwise", case.args, case.skip)
    checks.append(("layerwise_exact", lambda d: testing.check_layerwise_matches_standard(lw, d)))
    for check, fn in checks:
        t = time.time()
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fn(d)
                out[check] = "pass"
            except Exception as exc:  # a verdict, not a crash: recorded and reported
                out[check] = "fail: " + _short(exc)
                # paths relative to the repository: the results file is committed
                trace = traceback.format_exc(limit=3).replace(str(HERE.parents[2]) + "/", "")
                out[check + "_trace"] = trace[-800:]
        out[check + "_s"] = round(time.time() - t, 1)
    out["layerwise_exact"] = out["layerwise_exact"] == "pass"
    return out


def check_layerwise_form(key: str) -> dict:
    """The kit on ``po_<key>_layerwise`` as the table declares it (refusals, scheduled lr, resume)."""
    from optitrainer_pytorch_optimizer import ROWS

    from optitrainer import testing

    row = next(r for r in ROWS if r.upstream == key)
    (case,) = [c for c in testing.conformance_cases([row.name]) if c.optim == row.name + "_layerwise"]
    out: dict = {}
    for check, fn in [
        ("refusals", lambda d: testing.check_refusals(case)),
        ("scheduled_lr", lambda d: testing.check_scheduled_lr_reaches_update(case, d)),
        ("resume", lambda d: testing.check_resume(case, d)),
    ]:
        t = time.time()
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fn(d)
                out["layerwise_" + check] = "pass"
            except Exception as exc:
                out["layerwise_" + check] = "fail: " + _short(exc)
        out[f"layerwise_{check}_s"] = round(time.time() - t, 1)
    return out


def check_kit(key: str) -> dict:
    """The kit's ``learns`` and ``options`` checks on ``po_<key>`` as the installed table declares it."""
    from optitrainer_pytorch_optimizer import ROWS

    from optitrainer.kit import plan_for, run_plan

    row = next(r for r in ROWS if r.upstream == key)
    items, _ = plan_for([row.name], checks=["learns", "options"])
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        for item, result in zip(items, run_plan(items, d)):
            verdict = "pass" if result.status == "passed" else "fail" if result.failed else result.status
            out["kit_" + item.check] = f"{verdict}: {result.detail}".strip()
    return out


MODES = {"--layerwise-forms": check_layerwise_form, "--kit": check_kit}


def worker(keys: list[str], out_path: str, mode: str | None = None) -> None:
    import torch

    torch.set_num_threads(1)  # as the test suite: one thread per process (the machine is shared)
    with open(out_path, "a") as f:
        for key in keys:
            t = time.time()
            verdict = MODES[mode](key) if mode else check_one(key)
            verdict["total_s"] = round(time.time() - t, 1)
            f.write(json.dumps({key: verdict}) + "\n")
            f.flush()
            print(key, {k: v for k, v in verdict.items() if not k.endswith(("_s", "_trace"))}, flush=True)


def main(argv: list[str]) -> None:
    mode = next((a for a in argv if a in MODES), None)
    argv = [a for a in argv if a not in MODES]
    if argv[:1] == ["--worker"]:
        return worker(argv[2:], argv[1], mode)
    workers = 1
    if argv[:1] == ["--workers"]:
        workers, argv = int(argv[1]), argv[2:]
    from optitrainer_pytorch_optimizer import ROWS

    keys = argv or [r.upstream for r in ROWS if r.layerwise or mode != "--layerwise-forms"]
    parts = [HERE / f".sweep_part{i}.jsonl" for i in range(workers)]
    for p in parts:
        p.unlink(missing_ok=True)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                str(p),
                *keys[i::workers],
                *([mode] if mode else []),
            ]
        )
        for i, p in enumerate(parts)
    ]
    for proc in procs:
        proc.wait()
    merged = json.loads(RESULTS.read_text())["results"] if RESULTS.exists() else {}
    for p in parts:
        for line in p.read_text().splitlines():
            for key, verdict in json.loads(
                line
            ).items():  # a --layerwise-forms/--kit pass adds to the verdict
                merged[key] = {**merged.get(key, {}), **verdict}
        p.unlink()
    from importlib.metadata import version

    import torch
    import transformers

    meta = {
        "pytorch-optimizer": version("pytorch-optimizer"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    RESULTS.write_text(
        json.dumps({"versions": meta, "results": dict(sorted(merged.items()))}, indent=1) + "\n"
    )
    print(f"{len(merged)} verdicts -> {RESULTS}")


if __name__ == "__main__":
    main(sys.argv[1:])
