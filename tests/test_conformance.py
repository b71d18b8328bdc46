"""The conformance kit of optitrainer.testing over every registered optimizer and layerwise form."""

from __future__ import annotations

import pytest

from optitrainer.testing import (
    check_layerwise_matches_standard,
    check_refusals,
    check_resume,
    check_scheduled_lr_reaches_update,
    conformance_cases,
)

CASES = conformance_cases()
LAYERWISE = [c for c in CASES if c.optim.endswith("_layerwise")]


def _params(cases):
    return [
        pytest.param(c, id=c.optim, marks=[pytest.mark.skip(reason=c.skip)] if c.skip else []) for c in cases
    ]


@pytest.mark.parametrize("case", _params(CASES))
def test_resume_equals_uninterrupted(case, tmp_path):
    check_resume(case, tmp_path)


@pytest.mark.parametrize("case", _params(CASES))
def test_scheduled_lr_reaches_the_update(case, tmp_path):
    check_scheduled_lr_reaches_update(case, tmp_path)


@pytest.mark.parametrize("case", _params(LAYERWISE))
def test_layerwise_matches_standard(case, tmp_path):
    check_layerwise_matches_standard(case, tmp_path)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.optim) for c in CASES])
def test_unsupported_combinations_are_refused(case):
    check_refusals(case)


def test_every_seed_plugin_is_covered():
    names = {c.optim for c in CASES}
    assert {"adamw_torch", "sgd", "muon", "adamw_torch_layerwise"} <= names


def test_a_misspelled_name_fails_instead_of_checking_nothing():
    from optitrainer import UnknownOptimizerError

    with pytest.raises(UnknownOptimizerError, match="adamw_torch"):
        conformance_cases(["adamw_troch"])
    assert [c.optim for c in conformance_cases(["sgd"])] == ["sgd", "sgd_layerwise"]
