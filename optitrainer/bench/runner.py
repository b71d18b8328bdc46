"""One benchmark run in its own process: one optimizer under one trainer.

``python -m optitrainer.bench._child --config RUN.json --json-out RESULT.json``

Two phases, each on a freshly built model with the same seed:

1. **timed**: ``steps`` optimizer steps with nothing watching but a clock; gives the step times,
   the loss curve, the optimizer state right after the last step, the peak RSS (and, on CUDA, the
   allocator's peak);
2. **tracked**: ``mem_steps`` steps under :class:`~optitrainer.bench.memory.LiveTensorTracker`,
   which counts every live tensor byte and its role at the peak (slower, so not timed).

Progress goes to stdout as lines starting with :data:`EVENT_PREFIX`; the result is a JSON file.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from . import memory, models

EVENT_PREFIX = "@@optitrainer-bench "
TRAINERS = ("optitrainer", "transformers")


@dataclass
class RunConfig:
    """Everything one child process needs (JSON round-trips through the parent)."""

    optim: str  # optitrainer's canonical name, e.g. "galore_adamw_layerwise"
    trainer: str  # "optitrainer" or "transformers"
    trainer_optim: str  # the name given to the training arguments (transformers' own for the baseline)
    grad_rule: str = memory.GRADS_ALL  # gradients the method needs alive at once: "all" or "largest"
    model: str = "tiny"
    steps: int = 20
    warmup_steps: int = 2
    mem_steps: int = 3
    batch_size: int = 4
    seq_len: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    max_grad_norm: float = 0.0
    optim_args: str | None = None
    target_modules: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads in the child; None keeps torch's default
    repeat: int = 0  # which repetition of this (optimizer, trainer) pair this process is

    @property
    def label(self) -> str:
        return f"{self.optim} [{self.trainer}]"


def emit(event: dict[str, Any]) -> None:
    print(EVENT_PREFIX + json.dumps(event), flush=True)


class _StepClock(TrainerCallback):
    """Wall time between consecutive optimizer steps (everything the loop does: data, step, logging)."""

    def __init__(
        self,
        device: torch.device,
        phase: str,
        total: int,
        on_step: Callable[[dict], None],
        at_last_step: Callable[[], Any] | None = None,
    ):
        self.device, self.phase, self.total, self.on_step = device, phase, total, on_step
        self.stamps: list[float] = []
        self._at_last_step = at_last_step
        #: what ``at_last_step`` returned, after the last stamp (so outside every timed interval)
        self.last_step_value: Any = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps = [self._now()]

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(self._now())
        if self._at_last_step is not None and state.global_step >= state.max_steps:
            self.last_step_value = self._at_last_step()
        self.on_step({"event": "step", "phase": self.phase, "step": state.global_step, "of": self.total})

    @property
    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def _make_trainer(cfg: RunConfig, model, output_dir: str, max_steps: int, callbacks: list):
    from transformers.trainer_callback import PrinterCallback

    from ..testing import SyntheticLMDataset

    if cfg.trainer == "optitrainer":
        from .. import OptiTrainer as trainer_cls
        from .. import OptiTrainingArguments as args_cls
    elif cfg.trainer == "transformers":
        from transformers import Trainer as trainer_cls
        from transformers import TrainingArguments as args_cls
    else:
        raise ValueError(f"unknown trainer {cfg.trainer!r}; expected one of {TRAINERS}")
    args = args_cls(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.trainer_optim,
        optim_args=cfg.optim_args,
        optim_target_modules=cfg.target_modules,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=cfg.device == "cpu",
    )
    n = max(max_steps * cfg.batch_size * cfg.grad_accum, cfg.batch_size)
    data = SyntheticLMDataset(n=n, seq_len=cfg.seq_len, vocab_size=models.vocab_size(model), seed=cfg.seed)
    trainer = trainer_cls(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # no per-step printing inside the timed loop
    return trainer


def _unwrap(optimizer: Any) -> Any:
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]


def timed_phase(cfg: RunConfig, device: torch.device, workdir: str, on_event) -> dict[str, Any]:
    """Train ``cfg.steps`` steps with only a clock watching: step times, losses, state size, RSS."""
    gc.collect()
    rss_before = memory.rss_now_bytes()  # before the weights exist: RSS delta ~ every byte training needs
    model = models.build_model(cfg.model, cfg.seed, cfg.dtype)
    sizes = memory.model_sizes(model)
    # the optimizer state right after the last update (after train() some optimizers change mode:
    # schedule-free's eval mode keeps a copy of the weights until train() is called again)
    holder: dict[str, Any] = {}
    clock = _StepClock(
        device,
        "timed",
        cfg.steps,
        on_event,
        lambda: memory.optimizer_state_bytes(holder["trainer"].optimizer),
    )
    trainer = holder["trainer"] = _make_trainer(cfg, model, workdir, cfg.steps, [clock])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    durations = clock.durations
    measured = durations[cfg.warmup_steps :] or durations
    median = statistics.median(measured) if measured else None
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    after_train = memory.optimizer_state_bytes(trainer.optimizer)
    out = {
        "model": {**models.describe(model, cfg.model), **asdict(sizes)},
        "optimizer_class": type(_unwrap(trainer.optimizer)).__name__,
        "timing": {
            "step_times_s": durations,
            "warmup_steps": cfg.warmup_steps,
            "median_step_s": median,
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / median if median else None,
        },
        "losses": _losses(trainer),
        "state_bytes_end": after_train if clock.last_step_value is None else clock.last_step_value,
        "state_bytes_after_train": after_train,
        "rss_before_bytes": rss_before,
        "rss_peak_bytes": memory.rss_peak_bytes(),
        "sizes": sizes,
    }
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out


def tracked_phase(cfg: RunConfig, device: torch.device, workdir: str, on_event) -> dict[str, Any]:
    """Train ``cfg.mem_steps`` steps counting every live tensor byte; the breakdown at the peak."""
    model = models.build_model(cfg.model, cfg.seed, cfg.dtype)
    clock = _StepClock(device, "memory", cfg.mem_steps, on_event)
    trainer = _make_trainer(cfg, model, workdir, cfg.mem_steps, [clock])
    model = trainer.model  # on its device now
    tracker = memory.LiveTensorTracker(device, roles=memory.training_roles(model, lambda: trainer.optimizer))
    grads = memory.GradientWatch(tracker, model)
    tracker.start(existing=[*model.parameters(), *model.buffers()])
    try:
        trainer.train()
    finally:
        tracker.stop()
        grads.remove()
    return {
        "tracked_peak_bytes": tracker.peak,
        "max_grad_bytes_alive": grads.peak_bytes,
        "breakdown_at_peak": tracker.breakdown(),
        "other_at_peak_by_op": tracker.other_by_origin(),
        "untracked_role_bytes": tracker.untracked_role_bytes,
        "state_bytes_end_tracked": memory.optimizer_state_bytes(trainer.optimizer),
    }


def run(cfg: RunConfig, on_event: Callable[[dict], None] = emit) -> dict[str, Any]:
    """Both phases for one optimizer under one trainer; returns the JSON-ready result."""
    _quiet()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    if cfg.steps <= cfg.warmup_steps:
        raise ValueError(f"--steps ({cfg.steps}) must exceed --warmup-steps ({cfg.warmup_steps})")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="optitrainer-bench-") as workdir:
        on_event({"event": "phase", "phase": "timed", "of": cfg.steps})
        timed = timed_phase(cfg, device, workdir, on_event)
        gc.collect()
        tracked: dict[str, Any] = {}
        if cfg.mem_steps > 0:
            on_event({"event": "phase", "phase": "memory", "of": cfg.mem_steps})
            tracked = tracked_phase(cfg, device, workdir, on_event)
    sizes: memory.ModelSizes = timed.pop("sizes")
    floor = memory.analytic_floor(sizes, timed["state_bytes_end"], cfg.grad_rule)
    if device.type == "cuda":
        peak, source = timed["cuda_max_allocated_bytes"], "cuda_max_memory_allocated"
    else:
        peak, source = tracked.get("tracked_peak_bytes"), "live_tensor_storages"
    breakdown = tracked.get("breakdown_at_peak")
    rss_before, rss_peak = timed.pop("rss_before_bytes"), timed.pop("rss_peak_bytes")
    result = {
        "optim": cfg.optim,
        "trainer": cfg.trainer,
        "trainer_optim": cfg.trainer_optim,
        "ok": True,
        "config": asdict(cfg),
        **{k: timed[k] for k in ("model", "optimizer_class", "timing", "losses")},
        "final_loss": timed["losses"][-1] if timed["losses"] else None,
        "memory": {
            "peak_bytes": peak,
            "peak_source": source,
            "breakdown_at_peak": breakdown,
            "other_at_peak_by_op": tracked.get("other_at_peak_by_op"),
            "tracked_peak_bytes": tracked.get("tracked_peak_bytes"),
            "untracked_role_bytes": tracked.get("untracked_role_bytes"),
            "max_grad_bytes_alive": tracked.get("max_grad_bytes_alive"),
            "optimizer_state_bytes_end": timed["state_bytes_end"],
            "optimizer_state_bytes_after_train": timed["state_bytes_after_train"],
            "rss_before_bytes": rss_before,
            "rss_peak_bytes": rss_peak,
            "rss_delta_bytes": rss_peak - rss_before if rss_before is not None else None,
            "cuda_max_allocated_bytes": timed.get("cuda_max_allocated_bytes"),
            "cuda_max_reserved_bytes": timed.get("cuda_max_reserved_bytes"),
        },
        "floor": {**floor, "grad_rule": cfg.grad_rule},
        "peak_over_floor": peak / floor["total"] if peak and floor["total"] else None,
        "grads_at_peak_over_largest_param": (
            breakdown["grads"] / sizes.largest_param_bytes
            if breakdown and sizes.largest_param_bytes
            else None
        ),
        "max_grads_over_largest_param": (
            tracked["max_grad_bytes_alive"] / sizes.largest_param_bytes
            if tracked and sizes.largest_param_bytes
            else None
        ),
        "torch_threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - start,
    }
    return result


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("optitrainer").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optitrainer.bench._child", description=__doc__)
    parser.add_argument("--config", required=True, help="RunConfig as JSON")
    parser.add_argument("--json-out", required=True, help="where to write the result")
    ns = parser.parse_args(argv)
    with open(ns.config) as f:
        cfg = RunConfig(**json.load(f))
    try:
        result = run(cfg)
    except Exception as exc:  # the parent reports it next to the other runs
        traceback.print_exc()
        result = {
            "optim": cfg.optim,
            "trainer": cfg.trainer,
            "trainer_optim": cfg.trainer_optim,
            "ok": False,
            "config": asdict(cfg),
            "error": f"{type(exc).__name__}: {exc}",
        }
    with open(ns.json_out, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
