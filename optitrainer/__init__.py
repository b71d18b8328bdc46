"""optitrainer: any optimizer in ``transformers.Trainer``, found through entry-point plugins.

For people who train::

    from optitrainer import OptiTrainer, OptiTrainingArguments
    args = OptiTrainingArguments(output_dir="out", optim="galore_adamw_layerwise",
                                 optim_target_modules="all-linear", optim_args="rank=64")
    OptiTrainer(model=model, args=args, train_dataset=ds).train()

Plugin authors use :mod:`optitrainer.plugin`; :mod:`optitrainer.testing` checks a plugin.
"""

from .arguments import OptiArgumentsMixin, OptimizerChoice, OptiTrainingArguments, with_optitrainer
from .errors import (
    EngineNotInstalledError,
    IncompatibleConfigError,
    InvalidOptimArgsError,
    LaunchError,
    OptimizerNotInstalledError,
    OptiTrainerError,
    PluginLoadError,
    UnknownOptimizerError,
)
from .registry import OptimizerInfo, Provenance, ResolvedOptimizer, get_optimizer, list_optimizers, register
from .trainer import OptiTrainer, OptiTrainerMixin

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
    "get_optimizer",
    "list_optimizers",
    "register",
    "with_optitrainer",
]
