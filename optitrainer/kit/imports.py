"""The upstream package: absent (skip, with the pip command) or present and importable (else a failure)."""

from __future__ import annotations

import importlib
import importlib.metadata

from ..plugin import OptimizerSpec


def missing_distributions(spec: OptimizerSpec) -> list[str]:
    """The requirements of ``spec.requires`` whose distribution is not installed."""
    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    for req in spec.requires:
        try:
            name = Requirement(req).name
        except InvalidRequirement:
            continue  # the pip command shows it as written; nothing to look up
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(req)
    return missing


def check_upstream_imports(spec: OptimizerSpec) -> str:
    """Every module of ``spec.imports`` imports; a failure carries the import error.

    A module that is missing although the distributions of ``spec.requires`` are installed is a
    defect of the spec (a typo in ``imports``, or a requirement left out), never a skip.
    """
    for module in spec.imports:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import error is the finding
            hint = (
                f"the distribution(s) {', '.join(spec.requires)} are installed, so "
                if spec.requires
                else "the spec declares no requirement that would provide it, so "
            )
            raise AssertionError(
                f"{spec.name}: import {module!r} (from OptimizerSpec.imports) fails: "
                f"{type(exc).__name__}: {exc}. {hint}fix the module name in imports, or add the "
                "distribution that provides it to requires"
            ) from exc
    return "imports " + ", ".join(spec.imports) if spec.imports else "declares no upstream import"
