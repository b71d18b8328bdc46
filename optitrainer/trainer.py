"""``OptiTrainer``: ``transformers.Trainer`` whose optimizer comes from an optitrainer plugin.

The mixin knows no optimizer by name: it asks the plugin for the optimizer and reads its capability
flags for everything around the loop (who runs the backward pass, train/eval modes, layerwise hooks).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Trainer

from .arguments import OptimizerChoice, choose_optimizer
from .clean_exit import release_gloo_workers_at_exit
from .compat import check_arguments, clipping_scheme, raise_conflicts
from .data_parallel import (
    BucketedAverager,
    average_gradients,
    bucketed_averager,
    gradient_averager,
    replicate_without_ddp,
    without_ddp_reduction,
)
from .engine import Engine, engine_from_accelerator, engine_from_arguments, launch_problem
from .errors import LaunchError
from .layerwise import LayerwiseOptimizer, build_layerwise
from .log import follow_transformers_verbosity
from .optimizer_class import optimizer_cls_and_kwargs
from .plugin import BackwardContext, BuildContext
from .trainer_contract import check_environment

logger = logging.getLogger("optitrainer")


#: file beside every checkpoint's ``trainer_state.json``: which optimizer was built, by which distribution
PROVENANCE_FILE = "optitrainer.json"


def _warn_if_the_engine_asked_for_does_not_run(asked: Engine, running: Engine) -> None:
    """accelerate drops an engine it does not support where it runs (FSDP on CPU) and trains on."""
    if asked.kind not in ("fsdp", "deepspeed") or asked.kind == running.kind or running.world_size < 2:
        return
    logger.warning(
        "optitrainer: %s asks for %s, but accelerate runs %s%s. Training goes on with %s's memory use.",
        asked.source,
        asked,
        running,
        " (accelerate turns FSDP on only for GPUs and other accelerators, not with use_cpu)"
        if asked.kind == "fsdp" and running.kind == "ddp"
        else "",
        running,
    )


class OptiTrainerMixin:
    """Mix into any ``Trainer`` subclass (e.g. TRL's ``SFTTrainer``) to build its optimizer from a plugin.

    Training arguments may be :class:`~optitrainer.OptiTrainingArguments` (any name) or plain
    ``TrainingArguments`` (names transformers knows; plugins still provide them when installed).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # before the Trainer touches the model: a release whose hooks changed would train silently wrong
        check_environment()
        super().__init__(*args, **kwargs)
        follow_transformers_verbosity()  # the Trainer just applied log_level: say what runs at that level
        self._opti_optimizer: torch.optim.Optimizer | None = None
        self._opti_grad_norm: float | None = None
        self._opti_choice: OptimizerChoice | None = None
        #: the distributed engine the accelerator runs (DDP, DeepSpeed ZeRO-n, FSDPn or one process)
        self.opti_engine: Engine = engine_from_accelerator(self.accelerator)
        problem = launch_problem(self.opti_engine)
        if problem is not None:
            raise LaunchError(problem)
        _warn_if_the_engine_asked_for_does_not_run(engine_from_arguments(self.args), self.opti_engine)
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            self._opti_choice = choose_optimizer(self.args)
            # again with the engine that really runs: accelerate's config file, its environment or the
            # launcher may have chosen one the arguments do not show
            check_arguments(self._opti_choice.resolved, self.args, self.opti_engine)
            logger.info("optitrainer: distributed engine: %s", self.opti_engine)
            resolved = self._opti_choice.resolved
            caps = resolved.spec.capabilities
            if self.opti_engine.kind == "ddp" and (resolved.layerwise or caps.owns_backward):
                replicate_without_ddp(self.accelerator)  # the hooks average the gradients themselves
            elif self.opti_engine.kind == "ddp" and caps.changes_trainable:
                # DDP's reducer would only know the parameters trainable when it wrapped the model
                replicate_without_ddp(self.accelerator)  # training_step averages the gradients
            if self.model is not None:
                self._check_model(self.model)

    # -- setup ------------------------------------------------------------------------------------
    def _build_context(self, model: torch.nn.Module) -> BuildContext:
        choice = self._opti_choice
        return BuildContext(
            model=model,
            args=self.args,
            options=dict(choice.options or {}),
            name=choice.resolved.spec.name,
            layerwise=choice.resolved.layerwise,
            decay_names=set(self.get_decay_parameter_names(model)),
        )

    def _check_model(self, model: torch.nn.Module) -> None:
        """Model-dependent checks of the plugin (e.g. target modules), reported all at once."""
        spec = self._opti_choice.resolved.spec
        if spec.validate is not None:
            raise_conflicts(self._opti_choice.resolved, list(spec.validate(self._build_context(model))))

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None or self._opti_choice is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        resolved = self._opti_choice.resolved
        ctx = self._build_context(opt_model)
        if resolved.layerwise:
            optimizer = build_layerwise(
                resolved.spec,
                ctx,
                max_grad_norm=self.args.max_grad_norm,
                average_gradient=self._average_gradient,
                averager=self._bucketed_averager,
                clipping=self._layerwise_clipping(),
            )
        else:
            optimizer = resolved.spec.factory(ctx)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"the plugin {resolved.provenance} built a {type(optimizer).__name__} for optim={resolved.name!r}; "
                "a factory must return a torch.optim.Optimizer"
            )
        self.optimizer = self._opti_optimizer = optimizer
        logger.info(
            "optitrainer: optim=%r built %s from %s",
            resolved.name,
            type(optimizer).__name__,
            resolved.provenance,
        )
        if resolved.spec.callbacks is not None:
            for callback in resolved.spec.callbacks(optimizer):
                self.add_callback(callback)
        return self.optimizer

    def _layerwise_clipping(self) -> str:
        """The layerwise engine's clipping scheme: the arguments' choice; ``auto`` holds FSDP's shards."""
        chosen = clipping_scheme(getattr(self.args, "layerwise_clipping", "auto"), self.opti_engine.kind)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            logger.info("optitrainer: layerwise clipping scheme: %s", chosen)
        return chosen

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: torch.nn.Module | None = None) -> tuple[Any, Any]:
        """transformers' answer for any plugin name: ``(class, kwargs)``, or its factory form.

        See :func:`optitrainer.optimizer_class.optimizer_cls_and_kwargs`; layerwise and fused-backward
        names are refused (only OptiTrainer's training step runs them).
        """
        return optimizer_cls_and_kwargs(args, model)

    def _factory_optimizer(self) -> torch.optim.Optimizer:
        """An optimizer the plugin's factory built: in layerwise mode, the first parameter's."""
        optimizer = self._opti_optimizer
        if isinstance(optimizer, LayerwiseOptimizer):
            return next(iter(optimizer.inner.values()))
        return optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        spec = self._opti_choice.resolved.spec if self._opti_choice else None
        if (
            spec is not None
            and spec.log_values is not None
            and self._opti_optimizer is not None
            and "loss" in logs
        ):
            logs.update(spec.log_values(self._factory_optimizer()))
        super().log(logs, *args, **kwargs)

    # -- the training step -------------------------------------------------------------------------
    @property
    def _average_gradient(self):
        """Averages a gradient across ranks in place where the engine will not (DDP); else ``None``."""
        return gradient_averager(self.opti_engine) if self.opti_engine.kind == "ddp" else None

    @functools.cached_property
    def _bucketed_averager(self) -> BucketedAverager | None:
        """Averages gradients in buckets overlapped with backward where the engine will not (DDP); else ``None``.

        Buckets of ``ddp_bucket_cap_mb`` (DDP's 25 MiB when unset), as DDP's own reducer.
        """
        if self.opti_engine.kind != "ddp":
            return None
        return bucketed_averager(self.opti_engine, getattr(self.args, "ddp_bucket_cap_mb", None))

    @property
    def _opti_manages_gradients(self) -> bool:
        """True when gradients are consumed inside backward (layerwise, fused backward)."""
        if self._opti_choice is None or self._opti_optimizer is None:
            return False
        return (
            self._opti_choice.resolved.layerwise or self._opti_choice.resolved.spec.capabilities.owns_backward
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._opti_optimizer is None or self._opti_choice is None:
            return super().training_step(model, inputs, num_items_in_batch)
        resolved = self._opti_choice.resolved
        if resolved.layerwise:
            engine: LayerwiseOptimizer = self._opti_optimizer

            def step() -> torch.Tensor:
                return super(OptiTrainerMixin, self).training_step(model, inputs, num_items_in_batch)

            # the hooks average each gradient themselves (DDP's reducer would run after they stepped)
            with without_ddp_reduction(model):
                if self.opti_engine.kind == "fsdp":  # FSDP's hooks expect one backward per forward
                    loss = engine.run_training_step(step, sync=self.accelerator.sync_gradients)
                else:
                    engine.begin_step(sync=self.accelerator.sync_gradients)
                    with self._backward_replaced_by(engine.backward):
                        loss = step()
            if self.accelerator.sync_gradients:
                self._opti_grad_norm = engine.last_grad_norm
            return loss
        if resolved.spec.capabilities.owns_backward:
            with without_ddp_reduction(model), self._plugin_backward(model):
                return super().training_step(model, inputs, num_items_in_batch)
        if resolved.spec.capabilities.changes_trainable:
            with without_ddp_reduction(model):
                loss = super().training_step(model, inputs, num_items_in_batch)
            if self.accelerator.sync_gradients:  # the last micro-batch: average before clipping
                average_gradients(model.parameters(), self.opti_engine)
            return loss
        return super().training_step(model, inputs, num_items_in_batch)

    @contextlib.contextmanager
    def _backward_replaced_by(self, backward) -> Iterator[None]:
        """Route the stock ``accelerator.backward(loss, **kw)`` to ``backward(loss, accelerator_backward, **kw)``.

        Raises if the step ends without that call: a ``training_step`` that stopped calling
        ``accelerator.backward`` would leave clipping and the fused update undone, silently.
        """
        accelerator_backward = self.accelerator.backward
        calls = []

        def replaced(loss, **kw):
            calls.append(1)
            return backward(loss, accelerator_backward, **kw)

        self.accelerator.backward = replaced
        try:
            yield
        finally:
            del self.accelerator.backward  # back to the class's method
        if not calls:
            import transformers

            raise RuntimeError(
                f"transformers {transformers.__version__}'s {type(self).__name__}.training_step ran without "
                "calling accelerator.backward, which optitrainer replaces to run the optimizer's backward "
                "(layerwise hooks, clipping, fused update): this training step was not done as the optimizer "
                f"needs. {type(self).__name__} overrides training_step? Call self.accelerator.backward(loss) "
                "in it, as Trainer.training_step does."
            )

    @contextlib.contextmanager
    def _plugin_backward(self, model) -> Iterator[None]:
        """Route the stock ``accelerator.backward`` call to the plugin's fused backward+update."""
        spec = self._opti_choice.resolved.spec

        def fused_backward(loss: torch.Tensor, accelerator_backward: Any, **_: Any) -> None:
            self._opti_grad_norm = spec.backward(
                BackwardContext(
                    optimizer=self._opti_optimizer,
                    loss=loss,
                    lr=self._get_learning_rate(),
                    max_grad_norm=self.args.max_grad_norm,
                    model=model,
                    accelerator=self.accelerator,
                    average_gradient=gradient_averager(self.opti_engine),
                    averager=self._bucketed_averager,
                )
            )

        with self._backward_replaced_by(fused_backward):
            yield

    def _clip_grad_norm(self, model):
        if self._opti_manages_gradients:
            return self._opti_grad_norm  # measured inside backward, or None: never a made-up 0.0
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if self._opti_manages_gradients:
            return self._opti_grad_norm
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def train(self, *args: Any, **kwargs: Any):
        release_gloo_workers_at_exit()  # else a gloo launch may abort at exit after training succeeded
        try:
            return super().train(*args, **kwargs)
        finally:
            if isinstance(self._opti_optimizer, LayerwiseOptimizer):
                self._opti_optimizer.detach()

    # -- weights in the right mode ------------------------------------------------------------------
    @contextlib.contextmanager
    def _weights_for_saving(self) -> Iterator[None]:
        """Optimizers with train/eval modes (schedule-free) save the eval-mode weights."""
        opt = self._opti_optimizer
        caps = self._opti_choice.resolved.spec.capabilities if self._opti_choice else None
        if opt is None or caps is None or not caps.train_eval_modes:
            yield
            return
        was_training = bool(opt.param_groups[0].get("train_mode", True))
        opt.eval()
        try:
            yield
        finally:
            if was_training:
                opt.train()

    def _save_checkpoint(self, model, trial):
        with self._weights_for_saving():
            saved = super()._save_checkpoint(model, trial)
        self._save_provenance(trial)
        return saved

    def _save_provenance(self, trial) -> None:
        """Which optimizer, distribution and version trained this checkpoint, in a file of its own.

        Not a stateful callback: the callback list and ``trainer_state.json`` stay what ``Trainer`` writes,
        so a plain ``Trainer`` resumes the checkpoint without a word about callbacks it does not have.
        """
        if self._opti_choice is None or not self.args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = self.args.output_dir if trial is None else self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if os.path.isdir(folder):
            resolved = self._opti_choice.resolved
            provenance = {
                "optimizer": resolved.name,
                "distribution": resolved.provenance.distribution,
                "version": resolved.provenance.version,
            }
            with open(os.path.join(folder, PROVENANCE_FILE), "w") as f:
                json.dump(provenance, f, indent=1)

    # -- sharded checkpoints of the layerwise engine (FSDP2) -----------------------------------------
    #: folder of a checkpoint holding the layerwise engine's sharded state (torch.distributed.checkpoint)
    LAYERWISE_DCP_DIR = "optimizer_layerwise"

    def _layerwise_sharded(self) -> bool:
        # accelerate saves FSDP optimizers through torch's get_optimizer_state_dict, which expects torch's
        # {"state", "param_groups"} layout; the engine's per-parameter states go through DCP instead
        return isinstance(self._opti_optimizer, LayerwiseOptimizer) and self.opti_engine.kind == "fsdp"

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._layerwise_sharded():
            return super()._save_optimizer_and_scheduler(output_dir)
        from transformers.trainer import SCHEDULER_NAME

        from .distributed_checkpoint import save_sharded

        if getattr(self, "is_fsdp_enabled", False):
            # Trainer._save_optimizer_and_scheduler saves the FSDP model here too (pytorch_model_fsdp*), and
            # its resume (_load_from_checkpoint -> load_fsdp_model) reads nothing else under FSDP
            from transformers import trainer as hf_trainer

            hf_trainer.save_fsdp_model(
                self.accelerator.state.fsdp_plugin,
                self.accelerator,
                self.model,
                output_dir,
                **hf_trainer.get_fsdp_ckpt_kwargs(),
            )
        save_sharded(os.path.join(output_dir, self.LAYERWISE_DCP_DIR), self._opti_optimizer)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    @contextlib.contextmanager
    def _indexed_cpu_named_plainly(self) -> Iterator[None]:
        """transformers < 5.18 loads a multi-process CPU run's optimizer with ``map_location=args.device``:
        ``cpu:0`` under gloo, which torch cannot restore ("don't know how to restore data location ...
        tagged with cpu:0"; plain ``Trainer`` fails the same way). The same CPU, named plainly for the load.
        """
        device = self.args.device
        if self.args.world_size > 1 and device.type == "cpu" and device.index is not None:
            self.args.__dict__["_setup_devices"] = torch.device("cpu")  # the cached_property's slot
            try:
                yield
            finally:
                self.args.__dict__["_setup_devices"] = device
        else:
            yield

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._layerwise_sharded():
            with self._indexed_cpu_named_plainly():
                return super()._load_optimizer_and_scheduler(checkpoint)
        from transformers.trainer import SCHEDULER_NAME

        from .distributed_checkpoint import load_sharded

        load_sharded(os.path.join(checkpoint, self.LAYERWISE_DCP_DIR), self._opti_optimizer)
        self.lr_scheduler.load_state_dict(
            torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with self._weights_for_saving():
            return super().save_model(output_dir, _internal_call)


class OptiTrainer(OptiTrainerMixin, Trainer):
    """``transformers.Trainer`` with every optimizer that optitrainer's plugins provide."""
