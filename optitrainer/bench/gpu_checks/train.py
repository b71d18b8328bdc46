"""One training row: an optimizer under one trainer, timed, with its allocator peak and analytic floor."""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import memory
from ..runner import _losses, _StepClock, _unwrap
from .plan import OPTITRAINER, Job, Settings
from .weights import ModelSource


@dataclass
class Context:
    """What every row shares: the settings, the model source and a scratch directory."""

    settings: Settings
    source: ModelSource
    workdir: str

    @property
    def device(self) -> torch.device:
        return self.source.device


def dataset(settings: Settings, vocab_size: int):
    """The same ``batch_size`` sequences at every step (one batch per epoch).

    A fixed batch makes "the loss fell" a test of the update, not of the data: any sound optimizer at a
    sane rate lowers the loss of the batch it just stepped on.
    """
    from ...testing import SyntheticLMDataset

    return SyntheticLMDataset(
        n=settings.batch_size, seq_len=settings.seq_len, vocab_size=vocab_size, seed=settings.seed
    )


def build_trainer(
    ctx: Context,
    *,
    trainer: str,
    optim: str,
    model: torch.nn.Module,
    lr: float,
    steps: int,
    max_grad_norm: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
    optim_args: str | None = None,
    callbacks: Sequence[Any] = (),
):
    """``OptiTrainer`` or plain ``transformers.Trainer``, set up alike: bf16 autocast, constant rate, no decay.

    ``max_grad_norm`` is 0 for the timed rows, so both trainers do the same work (docs/benchmarks.md:
    "Why clipping is off by default"); the exactness checks clip.
    """
    from transformers.trainer_callback import PrinterCallback

    if trainer == OPTITRAINER:
        from ... import OptiTrainer as trainer_cls
        from ... import OptiTrainingArguments as args_cls
    else:
        from transformers import Trainer as trainer_cls
        from transformers import TrainingArguments as args_cls
    s = ctx.settings
    args = args_cls(
        output_dir=ctx.workdir,
        max_steps=steps,
        per_device_train_batch_size=s.batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=max_grad_norm,
        optim=optim,
        optim_args=optim_args,
        optim_target_modules=list(target_modules) if isinstance(target_modules, tuple) else target_modules,
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=s.seed,
        data_seed=s.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=ctx.device.type == "cpu",
    )
    data = dataset(s, int(model.config.vocab_size))
    built = trainer_cls(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
    built.remove_callback(PrinterCallback)  # no per-step printing inside the timed loop
    return built


class PeakMeter:
    """The most bytes a row held at once.

    CUDA: the caching allocator's ``max_memory_allocated`` since the row began, less what earlier rows
    left allocated. CPU (dry run): the exact live-tensor peak of the bench's tracker (the CPU has no
    allocator statistics).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.leftover = 0
        self.peak: int | None = None
        self._tracker: memory.LiveTensorTracker | None = None

    def before_model(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize(self.device)
            self.leftover = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def start(self, model: torch.nn.Module) -> None:
        if self.device.type != "cuda":
            self._tracker = memory.LiveTensorTracker(self.device)
            self._tracker.start(existing=[*model.parameters(), *model.buffers()])

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.leftover
        elif self._tracker is not None:
            self._tracker.stop()
            self.peak = self._tracker.peak
            self._tracker = None


@dataclass
class StateSummary:
    """The optimizer state right after the last update."""

    bytes: int  # on the training device: what the floor counts
    host_bytes: int  # kept in host memory (upstream GrokAdamW does), outside the device's peak
    uint8_tensors: int  # bitsandbytes' 8-bit states
    paged_tensors: int  # bitsandbytes' paged (unified-memory) states

    @classmethod
    def of(cls, optimizer: Any, device: torch.device) -> StateSummary:
        tensors = memory.optimizer_state_tensors(optimizer)
        on_device = [t for t in tensors if t.device.type == device.type]
        return cls(
            bytes=memory.unique_storage_bytes(on_device),
            host_bytes=memory.unique_storage_bytes(t for t in tensors if t.device.type != device.type),
            uint8_tensors=sum(t.dtype == torch.uint8 for t in tensors),
            paged_tensors=sum(bool(getattr(t, "is_paged", False)) for t in tensors),
        )


@dataclass
class Measured:
    """What one training row measured."""

    losses: list[float]
    step_times_s: list[float]
    warmup_steps: int
    peak_bytes: int | None
    floor_bytes: int
    state: StateSummary
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def median_step_s(self) -> float | None:
        timed = self.step_times_s[self.warmup_steps :] or self.step_times_s
        return statistics.median(timed) if timed else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def finite(self) -> bool:
        return bool(self.losses) and all(math.isfinite(x) for x in self.losses)


def train_and_measure(ctx: Context, job: Job) -> Measured:
    """Train ``job`` for the settings' steps on a fresh copy of the model; time it and measure its memory."""
    s = ctx.settings
    meter = PeakMeter(ctx.device)
    meter.before_model()
    model = ctx.source.fresh()
    holder: dict[str, Any] = {}
    # the state right after the last update: after train() a schedule-free optimizer is in eval mode and
    # holds a copy of the weights until train() is called again
    clock = _StepClock(
        ctx.device,
        "timed",
        s.steps,
        lambda event: None,
        lambda: StateSummary.of(holder["t"].optimizer, ctx.device),
    )
    trainer = holder["t"] = build_trainer(
        ctx,
        trainer=job.trainer,
        optim=job.trainer_optim or job.optim,
        model=model,
        lr=job.contender.lr,
        steps=s.steps,
        target_modules=job.target_modules,
        optim_args=job.optim_args,
        callbacks=[clock],
    )
    meter.start(trainer.model)
    try:
        trainer.train()
    finally:
        meter.stop()
    state = clock.last_step_value or StateSummary.of(trainer.optimizer, ctx.device)
    sizes = memory.model_sizes(trainer.model)
    floor = memory.analytic_floor(sizes, state.bytes, job.grad_rule)
    return Measured(
        losses=_losses(trainer),
        step_times_s=clock.durations,
        warmup_steps=s.warmup_steps,
        peak_bytes=meter.peak,
        floor_bytes=floor["total"],
        state=state,
        details={
            "floor": {**floor, "grad_rule": job.grad_rule},
            "leftover_bytes": meter.leftover,
            "optimizer_class": type(_unwrap(trainer.optimizer)).__name__,
            "trainer_optim": job.trainer_optim,
            "target_modules": job.target_modules,
            "optim_args": job.optim_args,
        },
    )
