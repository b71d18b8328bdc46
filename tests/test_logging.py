"""optitrainer's log lines follow transformers' verbosity: a standard HF script's log says what ran."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = """\
import logging, sys
import transformers
from optitrainer import OptiTrainer
from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments

# what run_clm.py does: a handler on the root logger, transformers' verbosity from the arguments
logging.basicConfig(format="%(name)s | %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
{setup}
args = training_arguments("out", optim="adamw_torch", max_steps=1)
OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset()).train()
"""
BUILT = "optitrainer | optitrainer: optim='adamw_torch' built AdamW from optitrainer"


def _run(tmp_path, setup: str) -> str:
    (tmp_path / "script.py").write_text(SCRIPT.format(setup=textwrap.dedent(setup)))
    proc = subprocess.run(
        [sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True
    )
    return proc.stdout


@pytest.mark.parametrize(
    "setup, shown",
    [
        ("transformers.utils.logging.set_verbosity_info()", True),
        ("transformers.utils.logging.set_verbosity_warning()", False),
        # a level set on optitrainer's logger itself wins over transformers'
        (
            "transformers.utils.logging.set_verbosity_info()\nlogging.getLogger('optitrainer').setLevel('ERROR')",
            False,
        ),
        ("logging.getLogger('optitrainer').setLevel('INFO')", True),
    ],
)
def test_what_ran_is_logged_at_transformers_verbosity(tmp_path, setup, shown):
    out = _run(tmp_path, setup)
    assert (BUILT in out) == shown, out[-2000:]
    if shown:
        assert "optitrainer: distributed engine: one process" in out
