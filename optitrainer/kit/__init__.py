"""The conformance kit: does a plugin's optimizer do what its spec claims?

``optitrainer check NAME`` runs it from the command line; ``optitrainer.testing.conformance_test`` is
the one-line pytest integration. Each (form, check) gives a :class:`CheckResult`: passed, failed (with
the finding and the fix), skipped (does not apply; upstream absent) or not runnable here (a claim this
machine cannot exercise, e.g. fp16 loss scaling without a GPU). See docs/plugins.md.
"""

from .checks import CHECK_NAMES, CHECKS, PlanItem, build_plan, run_item
from .pytest_integration import (
    conformance_params,
    conformance_test,
    parametrize_conformance,
    run_conformance_item,
)
from .result import FAILED, NOT_RUNNABLE, PASSED, SKIPPED, CheckResult, NotRunnable, Skip
from .runner import plan_for, run_plan
from .selection import CHECK_ALL_ENV

__all__ = [
    "CHECKS",
    "CHECK_ALL_ENV",
    "CHECK_NAMES",
    "FAILED",
    "NOT_RUNNABLE",
    "PASSED",
    "SKIPPED",
    "CheckResult",
    "NotRunnable",
    "PlanItem",
    "Skip",
    "build_plan",
    "conformance_params",
    "conformance_test",
    "parametrize_conformance",
    "plan_for",
    "run_conformance_item",
    "run_item",
    "run_plan",
]
