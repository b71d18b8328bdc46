"""Tools to test optimizers and plugins offline: a tiny Llama, generated data, and run helpers.

A plugin author runs the same checks the core runs over its built-ins::

    from optitrainer.testing import run_training, assert_same_run
    a = run_training("my_adam", tmp_path / "a", steps=20)
    b = run_training("adamw_torch", tmp_path / "b", steps=20)

Everything here works on CPU in float32 and downloads nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

TINY_VOCAB = 97


def tiny_llama_config(**overrides: Any):
    """A Llama config small enough to train for dozens of steps in a second on a CPU."""
    from transformers import LlamaConfig

    cfg = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, **config_overrides: Any):
    """A freshly initialised tiny ``LlamaForCausalLM`` (deterministic for a given seed)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides))
    return model.float()


class SyntheticLMDataset(torch.utils.data.Dataset):
    """Token sequences with learnable structure (noisy arithmetic progressions), generated from a seed."""

    def __init__(self, n: int = 256, seq_len: int = 16, vocab_size: int = TINY_VOCAB, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab_size, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        ids = (start + stride * torch.arange(seq_len)) % vocab_size
        noise = torch.rand(n, seq_len, generator=g) < 0.1
        ids = torch.where(noise, torch.randint(0, vocab_size, (n, seq_len), generator=g), ids)
        self.input_ids = ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@dataclass
class RunResult:
    """What a short training run produced."""

    losses: list[float]
    learning_rates: list[float]
    grad_norms: list[float | None]
    params: dict[str, torch.Tensor]
    trainer: Any = field(repr=False)
    eval_losses: list[float] = field(default_factory=list)


def training_arguments(output_dir: str | os.PathLike, *, arguments_cls=None, **overrides: Any):
    """Deterministic, quiet, CPU training arguments for tests (override anything)."""
    if arguments_cls is None:
        from .arguments import OptiTrainingArguments as arguments_cls
    kwargs = {
        "output_dir": str(output_dir),
        "max_steps": 20,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "data_seed": 0,
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return arguments_cls(**kwargs)


def run_training(
    optim: str,
    output_dir: str | os.PathLike,
    *,
    steps: int = 20,
    trainer_cls=None,
    arguments_cls=None,
    model=None,
    dataset=None,
    eval_dataset=None,
    resume_from_checkpoint: str | bool | None = None,
    **args_overrides: Any,
) -> RunResult:
    """Train ``model`` (default: :func:`tiny_llama`) with ``optim`` and return losses, lrs and final params.

    ``trainer_cls``/``arguments_cls`` default to :class:`~optitrainer.OptiTrainer` and
    :class:`~optitrainer.OptiTrainingArguments`; pass ``transformers.Trainer``/``TrainingArguments``
    to get the reference run.
    """
    if trainer_cls is None:
        from .trainer import OptiTrainer as trainer_cls
    args = training_arguments(
        output_dir, arguments_cls=arguments_cls, optim=optim, max_steps=steps, **args_overrides
    )
    model = tiny_llama() if model is None else model
    dataset = SyntheticLMDataset() if dataset is None else dataset
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    history = trainer.state.log_history
    steps_logged = [h for h in history if "loss" in h and "step" in h]
    return RunResult(
        losses=[h["loss"] for h in steps_logged],
        learning_rates=[h.get("learning_rate") for h in steps_logged],
        grad_norms=[h.get("grad_norm") for h in steps_logged],
        params={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        trainer=trainer,
        eval_losses=[h["eval_loss"] for h in history if "eval_loss" in h],
    )


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two parameter dicts with the same names."""
    assert a.keys() == b.keys(), f"different parameter names: {sorted(set(a) ^ set(b))[:5]}"
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def assert_same_run(a: RunResult, b: RunResult, *, atol: float = 0.0, params: bool = True) -> None:
    """Assert two runs have the same losses (and final parameters), within ``atol`` (0: identical)."""
    assert len(a.losses) == len(b.losses) and a.losses, (len(a.losses), len(b.losses))
    dl = max(abs(x - y) for x, y in zip(a.losses, b.losses))
    assert dl <= atol, f"losses differ by up to {dl:g}:\n{a.losses}\n{b.losses}"
    if params:
        dp = max_param_diff(a.params, b.params)
        assert dp <= atol, f"final parameters differ by up to {dp:g}"


def assert_learns(result: RunResult, *, min_drop: float = 0.05) -> None:
    """The loss went down and stayed finite."""
    assert all(math.isfinite(x) for x in result.losses), result.losses
    first, last = _mean(result.losses[:3]), _mean(result.losses[-3:])
    assert last < first * (1 - min_drop), f"loss did not drop: {first:.4f} -> {last:.4f}"


def step_temporaries_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Peak bytes of the tensors one ``optimizer.step()`` allocates besides the weights, gradients and state.

    Call it with the gradients set. The state's tensors are found in ``optimizer.state`` through
    dicts, lists and object attributes (e.g. a projector's matrix). A step after the first measures
    the steady state (the first one also creates the state). CPU tensors only.
    """
    from .bench.memory import LiveTensorTracker

    existing: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            existing += [p] if p.grad is None else [p, p.grad]
    _collect_tensors(optimizer.state, existing, set())
    tracker = LiveTensorTracker("cpu").start(existing=existing)
    base = tracker.current
    try:
        optimizer.step()
    finally:
        tracker.stop()
    return tracker.peak - base


def _collect_tensors(obj: Any, out: list[torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_tensors(v, out, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_tensors(v, out, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        _collect_tensors(vars(obj), out, seen)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


# --- conformance kit ---------------------------------------------------------------------------
#: the guide's target modules; select the attention and MLP linears of a Llama
GUIDE_TARGET_MODULES = [r".*.attn.*", r".*.mlp.*"]


@dataclass(frozen=True)
class ConformanceCase:
    """One ``optim=`` value to check, with the training arguments it needs to run at all."""

    optim: str
    args: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None
    #: the plugin failed to load: a failure of the kit's ``imports`` check, never a skip
    error: str | None = None

    def __str__(self) -> str:
        return self.optim


def conformance_cases(names: Sequence[str] | None = None) -> list[ConformanceCase]:
    """Every registered optimizer (or ``names``), plus its ``_layerwise`` form where it has one.

    A case is skipped only when the distributions of the spec's ``requires`` are not installed (the
    reason gives the pip command) or it needs CUDA; a plugin that fails to load, or whose ``imports``
    fail although its requirements are installed, is a case the kit's ``imports`` check fails.
    """
    from .kit.imports import missing_distributions
    from .registry import LAYERWISE_SUFFIX, REGISTRY

    wanted = None
    if names is not None:  # a typo must fail, not check nothing: UnknownOptimizerError with suggestions
        wanted = {REGISTRY.resolve(name, check_installed=False).spec.name for name in names} | set(names)
    cases = []
    for info in REGISTRY.list():
        if wanted is not None and info.name not in wanted:
            continue
        if info.error:
            cases.append(ConformanceCase(info.name, error=info.error))
            continue
        spec = REGISTRY.resolve(info.name, check_installed=False).spec
        caps = spec.capabilities
        args: dict[str, Any] = {}
        skip = None
        if caps.needs_target_modules:
            args["optim_target_modules"] = GUIDE_TARGET_MODULES
        if not caps.gradient_clipping:  # the trainer refuses max_grad_norm > 0 (checked by check_refusals)
            args["max_grad_norm"] = 0.0
        missing = missing_distributions(spec)
        if spec.recommended_lr:  # the rate it is meant to run at (a plugin may refuse others)
            args["learning_rate"] = spec.recommended_lr
        elif not missing and (spec.validate is not None or spec.validate_arguments is not None):
            # no declared rate (a plugin older than recommended_lr): one its own validators accept
            args["learning_rate"] = _validation_lr(REGISTRY.resolve(info.name, check_installed=False))
        if missing:
            skip = f"upstream package not installed ({spec.pip_command()})"
        elif caps.requires_cuda and not torch.cuda.is_available():
            skip = "needs a CUDA device"
        cases.append(ConformanceCase(info.name, args, skip))
        if caps.layerwise:
            cases.append(ConformanceCase(info.name + LAYERWISE_SUFFIX, args, skip))
    return cases


def conformance_test(
    *names: str,
    dist: str | None = None,
    checks: Sequence[str] | None = None,
    known_failures: dict[str, str] | None = None,
):
    """The whole kit as one pytest test function, one item per (form, check)::

        from optitrainer.testing import conformance_test
        test_conformance = conformance_test("my_adam")

    See :mod:`optitrainer.kit` for the checks and ``docs/plugins.md``.
    """
    from .kit.pytest_integration import conformance_test as make

    return make(*names, dist=dist, checks=checks, known_failures=known_failures)


def parametrize_conformance(*names: str, dist: str | None = None, checks: Sequence[str] | None = None):
    """``pytest.mark.parametrize("conformance_item", ...)`` over the kit's (form, check) items; run each
    with :func:`run_conformance_item`."""
    from .kit.pytest_integration import parametrize_conformance as make

    return make(*names, dist=dist, checks=checks)


def run_conformance_item(item, tmp_path) -> None:
    """Run one item of :func:`parametrize_conformance` as a test (fail with the finding, skip with why)."""
    from .kit.pytest_integration import run_conformance_item as run

    run(item, tmp_path)


def check_resume(case: ConformanceCase, tmp_dir, *, steps: int = 4) -> None:
    """``2*steps`` straight == ``steps`` + save + resume in a fresh trainer + ``steps``: same bits.

    Also checks the optimizer checkpoint loads with ``torch.load(weights_only=True)``.
    """
    from pathlib import Path

    tmp = Path(tmp_dir)
    kw = {"warmup_steps": 2, "weight_decay": 0.01, **case.args}
    straight = run_training(case.optim, tmp / "straight", steps=2 * steps, **kw)
    run_training(case.optim, tmp / "half", steps=2 * steps, save_strategy="steps", save_steps=steps, **kw)
    ckpt = tmp / "half" / f"checkpoint-{steps}"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert state, "the checkpoint holds no optimizer state"
    resumed = run_training(case.optim, tmp / "half", steps=2 * steps, resume_from_checkpoint=str(ckpt), **kw)
    assert_same_run(resumed, straight)
    assert resumed.learning_rates == straight.learning_rates


def check_scheduled_lr_reaches_update(case: ConformanceCase, tmp_dir) -> None:
    """A warmup that starts at lr 0 must leave the weights untouched on step 1; later steps move them.

    (Some optimizers stay still for a few steps by design, e.g. schedule-free RAdam's rectification.)
    """
    from transformers import TrainerCallback

    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    model = tiny_llama()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    from .trainer import OptiTrainer

    args = training_arguments(
        tmp_dir,
        optim=case.optim,
        max_steps=8,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=2,
        **case.args,
    )
    trainer = OptiTrainer(model=model, args=args, train_dataset=SyntheticLMDataset(), callbacks=[Snapshot()])
    trainer.train()
    assert len(snapshots) == 8
    moved_at_lr0 = max_param_diff(initial, snapshots[0])
    assert moved_at_lr0 == 0.0, f"step 1 ran at scheduled lr 0 but weights moved by {moved_at_lr0:g}"
    assert max_param_diff(snapshots[0], snapshots[-1]) > 0, "steps 2-8 (lr > 0) did not move the weights"


def check_layerwise_matches_standard(case: ConformanceCase, tmp_dir, *, steps: int = 8) -> None:
    """``X_layerwise`` == ``X`` (no clipping, warmup + linear decay): same losses and weights, bit for bit."""
    from pathlib import Path

    from .registry import LAYERWISE_SUFFIX

    assert case.optim.endswith(LAYERWISE_SUFFIX)
    kw = {"max_grad_norm": 0.0, "warmup_steps": 2, "weight_decay": 0.01, **case.args}
    lw = run_training(case.optim, Path(tmp_dir) / "lw", steps=steps, **kw)
    std = run_training(case.optim[: -len(LAYERWISE_SUFFIX)], Path(tmp_dir) / "std", steps=steps, **kw)
    assert_same_run(lw, std)


def check_refusals(case: ConformanceCase) -> None:
    """Every combination the capability flags rule out is refused, with the setting to change named."""
    from types import SimpleNamespace

    from .compat import argument_conflicts
    from .registry import REGISTRY

    resolved = REGISTRY.resolve(case.optim, check_installed=False)
    caps = resolved.spec.capabilities
    import tempfile

    lr_args = {} if "learning_rate" in case.args else {"learning_rate": _validation_lr(resolved)}
    with tempfile.TemporaryDirectory() as tmp:  # real arguments: a plugin's validate_arguments may read any
        real = vars(
            training_arguments(tmp, optim=case.optim, **{**lr_args, **case.args, "max_grad_norm": 0.0})
        )
    base = {
        **real,
        "gradient_accumulation_steps": 1,
        "max_grad_norm": 0.0,
        "fp16": False,
        "use_cpu": False,
        "world_size": 1,
        "deepspeed": None,
        "fsdp": [],
        "optim_target_modules": GUIDE_TARGET_MODULES,
    }

    def conflicts(**changes: Any) -> list[str]:
        return argument_conflicts(resolved, SimpleNamespace(**{**base, **changes}))

    if not caps.requires_cuda or torch.cuda.is_available():
        assert conflicts() == [], conflicts()
    _check_validators(resolved)
    if caps.needs_target_modules:
        assert any("optim_target_modules" in c for c in conflicts(optim_target_modules=None))
    if not caps.gradient_accumulation:
        assert any("gradient_accumulation_steps=1" in c for c in conflicts(gradient_accumulation_steps=2))
    if not caps.gradient_clipping:
        assert any("max_grad_norm=0" in c for c in conflicts(max_grad_norm=1.0))
    if not caps.fp16 or resolved.layerwise:
        assert any("fp16" in c for c in conflicts(fp16=True))
    if caps.requires_cuda:
        assert any("CUDA" in c for c in conflicts(use_cpu=True))
    from .compat import supported_engines
    from .engine import Engine
    from .plugin import ENGINE_MODES

    supported = supported_engines(resolved)
    for mode in ENGINE_MODES:
        engine = Engine.for_mode(mode, source="test")
        found = [c for c in argument_conflicts(resolved, SimpleNamespace(**base), engine) if str(engine) in c]
        assert bool(found) != (mode in supported), (mode, found)
        if found:  # the refusal names what to do
            assert "launch with" in found[0] or "train on one process" in found[0], found[0]


def _validation_lr(resolved) -> float:
    """The learning rate the kit runs a plugin's checks at: its ``recommended_lr``, or else the first rate
    of the learns check's sweep that its validators accept (``validate_arguments``, and ``validate(ctx)``
    where a plugin written for 0.1.0 refuses rates): such a plugin may refuse 1e-3 as a no-op."""
    from .kit.learning import LR_SWEEP

    spec = resolved.spec
    if spec.recommended_lr:
        return spec.recommended_lr
    if spec.validate_arguments is None and spec.validate is None:
        return LR_SWEEP[0]
    import tempfile

    from .errors import IncompatibleConfigError
    from .options import parse_optim_args
    from .plugin import BuildContext

    extra = {"optim_target_modules": GUIDE_TARGET_MODULES} if spec.capabilities.needs_target_modules else {}
    with tempfile.TemporaryDirectory() as tmp:
        for lr in LR_SWEEP:
            try:  # building the arguments runs the plugin's validate_arguments
                args = training_arguments(tmp, optim=resolved.name, learning_rate=lr, **extra)
                if spec.validate is not None:  # and a plugin of 0.1.0 may refuse the rate in validate(ctx)
                    options = parse_optim_args(spec, None)
                    if spec.validate(BuildContext(tiny_llama(), args, options, spec.name)):
                        continue
            except IncompatibleConfigError:
                continue
            except Exception:  # noqa: BLE001 - a crashing validator: the validator check reports it
                return lr
            return lr
    return LR_SWEEP[0]  # every rate refused: the validator check reports it


def _check_validators(resolved) -> None:
    """The plugin's ``validate_arguments`` and ``validate`` run on the kit's default setup: they return a
    list of strings (the problems), and nothing for defaults that train."""
    from .options import parse_optim_args
    from .plugin import BuildContext

    spec = resolved.spec
    if spec.validate is None and spec.validate_arguments is None:
        return
    import tempfile

    case_args = (
        {"optim_target_modules": GUIDE_TARGET_MODULES} if spec.capabilities.needs_target_modules else {}
    )
    with tempfile.TemporaryDirectory() as tmp:
        case_args["learning_rate"] = _validation_lr(resolved)
        args = training_arguments(tmp, optim=resolved.name, **case_args)
    options = parse_optim_args(spec, None)
    for label, run in (
        ("validate_arguments(args, options)", lambda: spec.validate_arguments(args, options)),
        ("validate(ctx)", lambda: spec.validate(BuildContext(tiny_llama(), args, options, spec.name))),
    ):
        if (spec.validate_arguments if label.startswith("validate_arguments") else spec.validate) is None:
            continue
        try:
            problems = run()
        except Exception as exc:  # noqa: BLE001 - a crashing validator hides every refusal it should give
            raise AssertionError(
                f"{spec.name}: {label} raised {type(exc).__name__}: {exc} on the default options; a "
                "validator returns a list of problems and never raises"
            ) from exc
        assert isinstance(problems, (list, tuple)) and all(isinstance(p, str) for p in problems), (
            f"{spec.name}: {label} returned {problems!r}; it must return a list of strings (the problems)"
        )
        assert not problems, (
            f"{spec.name}: {label} refuses the default options at learning_rate={args.learning_rate:g}"
            + ("" if spec.recommended_lr else " (no recommended_lr: the first rate of the sweep it accepts)")
            + f": {problems}"
        )
