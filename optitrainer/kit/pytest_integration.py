"""The kit in a plugin's own tests, in one line::

    # tests/test_conformance.py of your plugin
    from optitrainer.testing import conformance_test

    test_conformance = conformance_test("my_adam")        # or conformance_test(dist="my-plugin")

Every (form, check) becomes one test item, e.g. ``test_conformance[my_adam::learns]``; the distributed
items share one ``torchrun``. Each item runs on one thread, in its own temporary folder; a check whose
claim cannot be exercised on this machine, or that does not apply, is reported as skipped with why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .checks import PlanItem, run_item
from .result import FAILED, PASSED


def conformance_params(
    *names: str,
    dist: str | None = None,
    checks: Sequence[str] | None = None,
    known_failures: Mapping[str, str] | None = None,
):
    """``pytest.param`` per (form, check) of ``names`` (default: every registered name, sampled).

    ``known_failures`` maps an item id (``"galore_adamw::options"``) to why it fails and what fixes it:
    the item is a strict xfail, so it turns red again once the defect is fixed (then drop the entry).
    """
    import pytest

    from .runner import plan_for

    items, _ = plan_for(list(names) or None, dist=dist, checks=checks)
    known = dict(known_failures or {})
    out = []
    for item in items:
        marks = [pytest.mark.skip(reason=item.skip)] if item.skip else []
        if item.id in known:
            marks.append(pytest.mark.xfail(strict=True, reason=known[item.id]))
        out.append(pytest.param(item, id=item.id, marks=marks))
    return out


def parametrize_conformance(
    *names: str,
    dist: str | None = None,
    checks: Sequence[str] | None = None,
    known_failures: Mapping[str, str] | None = None,
):
    """``@parametrize_conformance("my_adam")`` on ``def test_x(conformance_item, tmp_path)``; call
    :func:`run_conformance_item` in the body."""
    import pytest

    params = conformance_params(*names, dist=dist, checks=checks, known_failures=known_failures)
    return pytest.mark.parametrize("conformance_item", params)


def run_conformance_item(item: PlanItem, tmp_path) -> None:
    """Run one item as a test: fails with the check's finding, skips with why it could not run."""
    import pytest
    import torch

    from .runner import distributed_result

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and CI machines are shared
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        if item.distributed and item.batch:
            result = distributed_result(item, _shared_dir(tmp_path))
        else:
            result = run_item(item, tmp_path)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    if result.status == FAILED:
        pytest.fail(f"{result.optim} {result.check}: {result.detail}", pytrace=False)
    if result.status != PASSED:
        pytest.skip(f"{result.status}: {result.detail}")


def _shared_dir(tmp_path):
    # the distributed batch serves every item: keep it in the session's base folder, beside the items'
    return tmp_path.parent / "optitrainer-distributed"


def conformance_test(
    *names: str,
    dist: str | None = None,
    checks: Sequence[str] | None = None,
    known_failures: Mapping[str, str] | None = None,
):
    """A ready test function over ``names`` (or every name of ``dist``): assign it to ``test_...``."""

    @parametrize_conformance(*names, dist=dist, checks=checks, known_failures=known_failures)
    def test_conformance(conformance_item, tmp_path):
        run_conformance_item(conformance_item, tmp_path)

    return test_conformance
