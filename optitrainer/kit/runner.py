"""Run a plan: every per-form check in turn, then every distributed run in one launch."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from .checks import PlanItem, build_plan, run_item
from .result import CheckResult

_DISTRIBUTED_CACHE: dict[tuple, dict[tuple[str, str], CheckResult]] = {}


def plan_for(
    names: Sequence[str] | None = None, *, dist: str | None = None, sampled: bool | None = None, checks=None
):
    """The plan for ``names`` (or the distribution ``dist``, or every registered name, sampled unless
    ``OPTITRAINER_CHECK_ALL=1``). Returns ``(items, {distribution: names left out by sampling})``."""
    from ..testing import conformance_cases
    from .selection import check_all, default_names, distributed_sample, distribution_names

    left_out: dict[str, list[str]] = {}
    if names:
        chosen = list(names)
        sampled = False if sampled is None else sampled
    elif dist:
        chosen = distribution_names(dist)
        sampled = False if sampled is None else sampled
    else:
        chosen, left_out = default_names(sampled)
        sampled = not check_all() if sampled is None else sampled
    cases = conformance_cases(chosen)
    items = build_plan(
        cases, distributed_sample=distributed_sample(cases) if sampled else None, checks=checks
    )
    return items, left_out


def distributed_result(item: PlanItem, tmp_root) -> CheckResult:
    """The result of a distributed item; the first call launches the plan's whole batch at once."""
    from .distributed import run_distributed

    key = tuple(r.name for r in item.batch)
    if key not in _DISTRIBUTED_CACHE:
        results = run_distributed(list(item.batch), Path(tmp_root) / "distributed")
        _DISTRIBUTED_CACHE[key] = {(r.optim, r.check): r for r in results}
    return _DISTRIBUTED_CACHE[key][(item.case.optim, item.check)]


def run_plan(
    items: Sequence[PlanItem], tmp_root=None, on_result: Callable[[CheckResult], None] | None = None
) -> list[CheckResult]:
    """Run every item (one ``torchrun`` for all distributed ones); ``on_result`` sees each as it comes."""
    own = tmp_root is None
    holder = tempfile.TemporaryDirectory(prefix="optitrainer-check-") if own else None
    root = Path(holder.name if own else tmp_root)
    root.mkdir(parents=True, exist_ok=True)
    results: list[CheckResult] = []
    cwd = os.getcwd()
    try:
        os.chdir(root)  # relative output_dirs of a plugin land here, not in the user's folder
        for n, item in enumerate(items):
            # the trainer prints every log line; a check reports its own finding instead
            quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
            with quiet[0], quiet[1], warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if item.distributed and item.batch:
                    result = distributed_result(item, root)
                else:
                    result = run_item(item, root / f"{n}-{item.case.optim}-{item.check}")
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        os.chdir(cwd)
        if holder is not None:
            holder.cleanup()
    return results
