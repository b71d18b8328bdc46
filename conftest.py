"""Repository-wide pytest setup (core tests and every plugin's tests)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Plugins written for 0.1.0 run their own tests in a process of their own (tests/test_legacy_plugins.py)
collect_ignore = ["tests/legacy_plugins"]

# Tiny models train fastest on one thread; on a 2-core CI machine more threads only contend.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Run each test from its own temporary folder: relative output_dirs never land in the checkout."""
    monkeypatch.chdir(tmp_path)
