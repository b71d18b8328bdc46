"""Load transformers' vendored Trainer tests once per trainer, as the drop-in promise needs.

``test_trainer_callback.py`` (and its helper ``trainer_test_utils.py``) are upstream files, unchanged. They
bind ``Trainer`` and ``TrainingArguments`` with ``from transformers import ...`` at import time, so each
variant imports its own copy of them, inside a synthetic package, while ``transformers.Trainer`` and
``transformers.TrainingArguments`` are the variant's classes; both are restored right after the import.

- ``optitrainer``: :class:`optitrainer.OptiTrainer` and :class:`optitrainer.OptiTrainingArguments`
- ``transformers``: plain ``transformers.Trainer`` and ``TrainingArguments`` (the baseline)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import os
import sys
import types
import unittest
from collections.abc import Iterator
from pathlib import Path

# no hub access at test time (also set by the root conftest; here for direct imports of this module)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
#: the vendored test modules (not collected themselves: see conftest.py)
VENDORED = ("test_trainer_callback",)
VARIANTS = ("optitrainer", "transformers")


def classes(variant: str) -> tuple[type, type]:
    """``(Trainer, TrainingArguments)`` of a variant."""
    if variant == "optitrainer":
        from optitrainer import OptiTrainer, OptiTrainingArguments

        return OptiTrainer, OptiTrainingArguments
    if variant == "transformers":
        from transformers.trainer import Trainer
        from transformers.training_args import TrainingArguments

        return Trainer, TrainingArguments
    raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")


@contextlib.contextmanager
def transformers_classes(trainer_cls: type, args_cls: type) -> Iterator[None]:
    """``transformers.Trainer`` / ``transformers.TrainingArguments`` are these classes inside the block."""
    import transformers

    names = {"Trainer": trainer_cls, "TrainingArguments": args_cls}
    saved = {name: getattr(transformers, name) for name in names}  # resolves the lazy attributes first
    try:
        for name, cls in names.items():
            setattr(transformers, name, cls)
        yield
    finally:
        for name, cls in saved.items():
            setattr(transformers, name, cls)


def load(variant: str, module: str = "test_trainer_callback") -> types.ModuleType:
    """The vendored ``module`` imported with the ``variant``'s trainer as ``transformers.Trainer`` (cached)."""
    package = f"_upstream_transformers_{variant}"
    name = f"{package}.{module}"
    if name in sys.modules:
        return sys.modules[name]
    if package not in sys.modules:
        # a package of its own per variant: the relative `from .trainer_test_utils import ...` gets
        # that variant's copy of the helpers too
        spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
        spec.submodule_search_locations = [str(HERE)]
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[package] = pkg
    trainer_cls, args_cls = classes(variant)
    with transformers_classes(trainer_cls, args_cls):
        mod = importlib.import_module(name)
    # the substitution really reached the module under test
    assert mod.Trainer is trainer_cls and mod.TrainingArguments is args_cls, (
        mod.Trainer,
        mod.TrainingArguments,
    )
    return mod


def test_cases(variant: str, module: str = "test_trainer_callback") -> dict[str, type]:
    """The ``unittest.TestCase`` classes of the vendored module, to expose in a collected test module."""
    mod = load(variant, module)
    return {
        key: value
        for key, value in vars(mod).items()
        if isinstance(value, type)
        and issubclass(value, unittest.TestCase)
        and value.__module__ == mod.__name__
    }
