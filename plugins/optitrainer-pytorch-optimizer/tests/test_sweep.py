"""Every name of the bridge through the conformance kit: ``make test-bridge-sweep``.

Behind ``OPTITRAINER_BRIDGE_SWEEP=1`` (587 items, about an hour of CPU time); the default run checks a sample
(tests/test_bridge.py). The table's verdicts come from tools/sweep.py, which runs the same checks.
"""

from __future__ import annotations

import os

import pytest
from optitrainer_pytorch_optimizer import ROWS

from optitrainer.testing import (
    check_layerwise_matches_standard,
    check_refusals,
    check_resume,
    check_scheduled_lr_reaches_update,
    conformance_cases,
)

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("OPTITRAINER_BRIDGE_SWEEP") != "1",
        reason="set OPTITRAINER_BRIDGE_SWEEP=1 for the full sweep",
    ),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
CASES = conformance_cases([r.name for r in ROWS]) if os.environ.get("OPTITRAINER_BRIDGE_SWEEP") == "1" else []
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
