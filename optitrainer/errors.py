"""Error classes. Each subclasses the matching builtin and its message ends with the fix."""

from __future__ import annotations


class OptiTrainerError(Exception):
    """Base class of every error raised by optitrainer."""


class UnknownOptimizerError(OptiTrainerError, LookupError):
    """``optim=`` names no registered optimizer."""


class OptimizerNotInstalledError(OptiTrainerError, ImportError):
    """The plugin is registered but the upstream package it wraps is not importable."""


class InvalidOptimArgsError(OptiTrainerError, ValueError):
    """An ``optim_args`` key is unknown, or its value has the wrong type or range."""


class EngineNotInstalledError(OptiTrainerError, ImportError):
    """The arguments ask for a distributed engine (DeepSpeed) whose package is not installed."""


class IncompatibleConfigError(OptiTrainerError, ValueError):
    """The optimizer cannot run truthfully with these training arguments (all conflicts listed)."""


class PluginLoadError(OptiTrainerError, ImportError):
    """A plugin's entry point failed to load, or two distributions register the same name."""


class LaunchError(OptiTrainerError, RuntimeError):
    """The launcher started fewer processes than its configuration asks for."""


class UnsupportedVersionError(OptiTrainerError, ImportError):
    """The installed transformers, accelerate or torch lies outside the range optitrainer was tested on,
    or lacks a hook the trainer relies on."""
