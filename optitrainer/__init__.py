"""optitrainer: any optimizer in ``transformers.Trainer``, found through entry-point plugins.

For people who train::

    from optitrainer import OptiTrainer, OptiTrainingArguments
    args = OptiTrainingArguments(output_dir="out", optim="galore_adamw_layerwise",
                                 optim_target_modules="all-linear", optim_args="rank=64")
    OptiTrainer(model=model, args=args, train_dataset=ds).train()

Plugin authors use :mod:`optitrainer.plugin`; :mod:`optitrainer.testing` checks a plugin.
"""

from typing import TYPE_CHECKING

from .clean_exit import release_gloo_workers_at_exit
from .errors import (
    EngineNotInstalledError,
    IncompatibleConfigError,
    InvalidOptimArgsError,
    LaunchError,
    OptimizerNotInstalledError,
    OptiTrainerError,
    PluginLoadError,
    UnknownOptimizerError,
    UnsupportedVersionError,
)
from .registry import OptimizerInfo, Provenance, ResolvedOptimizer, get_optimizer, list_optimizers, register

if TYPE_CHECKING:
    from .arguments import OptiArgumentsMixin, OptimizerChoice, OptiTrainingArguments, with_optitrainer
    from .trainer import OptiTrainer, OptiTrainerMixin
    from .trainer_contract import check_environment

# torch and transformers load on first use of the trainer side, so that listing plugins
# (`optitrainer list`, `import optitrainer.plugin`) stays cheap
_LAZY = {
    "OptiArgumentsMixin": "arguments",
    "OptimizerChoice": "arguments",
    "OptiTrainingArguments": "arguments",
    "with_optitrainer": "arguments",
    "OptiTrainer": "trainer",
    "OptiTrainerMixin": "trainer",
    "check_environment": "trainer_contract",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "EngineNotInstalledError",
    "IncompatibleConfigError",
    "InvalidOptimArgsError",
    "LaunchError",
    "OptiArgumentsMixin",
    "OptiTrainer",
    "OptiTrainerError",
    "OptiTrainerMixin",
    "OptiTrainingArguments",
    "OptimizerChoice",
    "OptimizerInfo",
    "OptimizerNotInstalledError",
    "PluginLoadError",
    "Provenance",
    "ResolvedOptimizer",
    "UnknownOptimizerError",
    "UnsupportedVersionError",
    "get_optimizer",
    "list_optimizers",
    "check_environment",
    "register",
    "release_gloo_workers_at_exit",
    "with_optitrainer",
]
