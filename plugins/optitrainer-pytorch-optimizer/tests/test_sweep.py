"""Every name of the bridge through the conformance kit: ``make test-bridge-sweep``.

Behind ``OPTITRAINER_BRIDGE_SWEEP=1`` (a little over an hour of CPU time); the default run checks a sample
(tests/test_bridge.py). The table's verdicts come from tools/sweep.py, which runs the same checks; the
known kit failures of kept names (tools/generate_table.py ``KIT_KNOWN_FAILURES``) are strict xfails.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from optitrainer_pytorch_optimizer import ROWS

from optitrainer.testing import (
    check_layerwise_matches_standard,
    check_refusals,
    check_resume,
    check_scheduled_lr_reaches_update,
    conformance_cases,
    conformance_test,
)

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("OPTITRAINER_BRIDGE_SWEEP") != "1",
        reason="set OPTITRAINER_BRIDGE_SWEEP=1 for the full sweep",
    ),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
SWEEP = os.environ.get("OPTITRAINER_BRIDGE_SWEEP") == "1"
CASES = conformance_cases([r.name for r in ROWS]) if SWEEP else []
STANDARD = [c for c in CASES if not c.optim.endswith("_layerwise")]
LAYERWISE = [c for c in CASES if c.optim.endswith("_layerwise")]


def _ids(cases):
    return [c.optim for c in cases]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_refusals(case):
    check_refusals(case)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_scheduled_lr_reaches_the_update(case, tmp_path):
    check_scheduled_lr_reaches_update(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_resume_equals_uninterrupted(case, tmp_path):
    check_resume(case, tmp_path)


@pytest.mark.parametrize("case", LAYERWISE, ids=_ids(LAYERWISE))
def test_layerwise_matches_standard(case, tmp_path):
    check_layerwise_matches_standard(case, tmp_path)


def _known_kit_failures() -> dict[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        from generate_table import KIT_KNOWN_FAILURES, PREFIX
    finally:
        sys.path.pop(0)
    return {f"{PREFIX}{k}::{v.split(':')[0]}": v for k, v in KIT_KNOWN_FAILURES.items()}


if SWEEP:  # the plan resolves every name: only when the sweep runs
    test_kit_learns_and_options = conformance_test(
        *[r.name for r in ROWS], checks=["learns", "options"], known_failures=_known_kit_failures()
    )
