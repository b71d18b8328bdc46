"""The contract between ``OptiTrainer`` and the transformers, accelerate and torch releases it runs on.

``OptiTrainer`` overrides private ``Trainer`` methods and replaces ``accelerator.backward`` for one
step. A release that renames or stops calling one of them does not fail: the override becomes dead
code and training goes on silently wrong (transformers 5.0-5.2 have no ``Trainer._clip_grad_norm``, so
every layerwise and LOMO run logged a gradient norm of 0.0). So the trainer checks, when it is built,
that the installed versions lie in the range the tests ran on (:data:`SUPPORTED`, the same ranges
``pyproject.toml`` declares) and that every hook it relies on exists with the parameters it passes
(:data:`HOOKS`), and refuses otherwise, naming the range and the ``pip install`` that fixes it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
from dataclasses import dataclass

from .errors import UnsupportedVersionError

__all__ = ["HOOKS", "SUPPORTED", "Hook", "check_environment", "environment_problems"]

#: The version ranges the test suite ran on: the CI suite at the newest releases, the compatibility
#: run (``make test-floor``) at every floor. ``pyproject.toml`` declares the same (a test holds them equal).
SUPPORTED: dict[str, str] = {
    "torch": ">=2.6",
    "transformers": ">=5.3,<6",
    "accelerate": ">=1.3",
}

#: Set to 1 to train on a release outside :data:`SUPPORTED` anyway (a warning instead of a refusal).
#: The hooks are still checked: a missing or changed one is refused whatever this says.
ALLOW_UNTESTED_ENV = "OPTITRAINER_ALLOW_UNTESTED_VERSIONS"


@dataclass(frozen=True)
class Hook:
    """A method (or attribute) of transformers or accelerate that ``OptiTrainer`` overrides or calls.

    ``params`` are the leading parameter names it is called with (``self`` included for methods); any
    further parameter must have a default. ``None`` checks only that the attribute exists.
    """

    module: str
    owner: str
    name: str
    params: tuple[str, ...] | None
    why: str

    @property
    def qualname(self) -> str:
        return f"{self.owner}.{self.name}" if self.owner else self.name


_T = ("transformers.trainer", "Trainer")
_A = ("accelerate", "Accelerator")

#: Every hook of transformers' ``Trainer`` and accelerate's ``Accelerator`` that optitrainer relies on.
HOOKS: tuple[Hook, ...] = (
    Hook(*_T, "create_optimizer", ("self", "model"), "builds the plugin's optimizer"),
    Hook(
        *_T,
        "training_step",
        ("self", "model", "inputs", "num_items_in_batch"),
        "routes backward to the layerwise engine or the plugin's fused backward",
    ),
    Hook(
        *_T,
        "_clip_grad_norm",
        ("self", "model"),
        "reports the gradient norm measured inside backward (layerwise, LOMO) instead of clipping gradients "
        "that are already freed",
    ),
    Hook(
        *_T,
        "_get_grad_norm",
        ("self", "model", "grad_norm"),
        "logs the measured gradient norm (never a made-up 0.0)",
    ),
    Hook(*_T, "log", ("self", "logs"), "adds the plugin's logged values"),
    Hook(*_T, "_save_checkpoint", ("self", "model", "trial"), "saves the eval-mode weights (schedule-free)"),
    Hook(*_T, "save_model", ("self", "output_dir", "_internal_call"), "saves the eval-mode weights"),
    Hook(
        *_T,
        "_save_optimizer_and_scheduler",
        ("self", "output_dir"),
        "saves the layerwise engine's sharded state under FSDP2",
    ),
    Hook(
        *_T,
        "_load_optimizer_and_scheduler",
        ("self", "checkpoint"),
        "resumes the layerwise engine's sharded state under FSDP2",
    ),
    Hook(*_T, "train", ("self",), "releases gloo's workers at exit and detaches the layerwise hooks"),
    Hook(*_T, "get_decay_parameter_names", ("self", "model"), "tells the plugin which weights decay"),
    Hook(*_T, "_get_learning_rate", ("self",), "hands the scheduled learning rate to a fused backward"),
    Hook(*_T, "add_callback", ("self", "callback"), "adds the plugin's callbacks"),
    Hook(
        *_T, "_get_output_dir", ("self", "trial"), "finds a checkpoint's folder under hyperparameter search"
    ),
    Hook(
        *_T,
        "get_optimizer_cls_and_kwargs",
        ("args", "model"),
        "builds transformers' own optimizers for names no plugin provides, and answers for plugin names",
    ),
    Hook("transformers.trainer", "", "SCHEDULER_NAME", None, "names the scheduler file of a checkpoint"),
    Hook(
        "transformers.trainer",
        "",
        "save_fsdp_model",
        ("fsdp_plugin", "accelerator", "model", "output_dir"),
        "saves the FSDP model beside the layerwise engine's sharded state, where the Trainer's resume reads it",
    ),
    Hook(
        "transformers.trainer", "", "get_fsdp_ckpt_kwargs", (), "passes the Trainer's FSDP checkpoint options"
    ),
    Hook("transformers.trainer_utils", "", "PREFIX_CHECKPOINT_DIR", None, "names the checkpoint folders"),
    Hook("transformers.training_args", "", "OptimizerNames", None, "lists the names transformers knows"),
    Hook(*_A, "backward", ("self", "loss"), "the call training_step makes, replaced for one step"),
    Hook(
        *_A,
        "prepare_model",
        ("self", "model", "device_placement", "evaluation_mode"),
        "keeps a layerwise or fused-backward model out of DDP's wrapper",
    ),
    Hook(*_A, "sync_gradients", None, "tells the last micro-batch of an accumulation"),
    Hook("accelerate.utils", "", "DistributedType", None, "tells which engine runs"),
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_problems(supported: dict[str, str] | None = None) -> list[str]:
    """Each installed package whose version lies outside its supported range, as ``"torch 2.5.1"``."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    out = []
    for dist, spec in (SUPPORTED if supported is None else supported).items():
        installed = _version(dist)
        if installed is None:
            out.append(f"{dist} is not installed")
            continue
        # a local build tag (2.13.0+cpu, 2.11.0+cu130) is the same release for the range
        if Version(Version(installed).public) not in SpecifierSet(spec):
            out.append(f"{dist} {installed} (supported: {spec})")
    return out


def _signature_problem(obj: object, params: tuple[str, ...]) -> str | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: existence is all that can be checked
    names = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if names[: len(params)] != list(params):
        return f"takes ({', '.join(names)}), expected ({', '.join(params)}, ...)"
    extra = [
        p.name
        for p in list(signature.parameters.values())[len(params) :]
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if extra:
        return f"needs the parameter(s) {', '.join(extra)}, which optitrainer does not pass"
    return None


def hook_problems(hooks: tuple[Hook, ...] = HOOKS) -> list[str]:
    """Each hook that is missing or whose parameters changed, with what optitrainer uses it for."""
    out = []
    for hook in hooks:
        try:
            owner = importlib.import_module(hook.module)
            if hook.owner:
                owner = getattr(owner, hook.owner)
        except (ImportError, AttributeError) as e:
            out.append(f"{hook.module}.{hook.owner} cannot be imported ({e}); optitrainer {hook.why}")
            continue
        obj = inspect.getattr_static(owner, hook.name, None)
        if obj is None:
            out.append(f"{hook.qualname} is missing; optitrainer uses it: {hook.why}")
            continue
        if hook.params is None:
            continue
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        problem = _signature_problem(obj, hook.params)
        if problem is not None:
            out.append(f"{hook.qualname} {problem}; optitrainer uses it: {hook.why}")
    return out


def _versions_line() -> str:
    return ", ".join(f"{d} {_version(d) or 'missing'}" for d in SUPPORTED)


def _pip_fix() -> str:
    return "pip install " + " ".join(f"'{dist}{spec}'" for dist, spec in SUPPORTED.items() if dist != "torch")


def environment_problems() -> tuple[list[str], list[str]]:
    """``(versions outside the supported ranges, hooks missing or changed)``."""
    return version_problems(), hook_problems()


def check_environment() -> None:
    """Refuse, before anything trains, a transformers/accelerate/torch that optitrainer was not tested on.

    Raises :class:`~optitrainer.errors.UnsupportedVersionError` listing every problem at once with the
    supported ranges and the ``pip install`` that fixes them. With ``OPTITRAINER_ALLOW_UNTESTED_VERSIONS=1``
    a version outside the ranges only warns; a missing or changed hook is refused whatever it says.
    """
    versions, hooks = environment_problems()
    allow_untested = os.environ.get(ALLOW_UNTESTED_ENV, "").strip().lower() in {"1", "true", "yes"}
    if not hooks and (not versions or allow_untested):
        if versions:
            import warnings

            warnings.warn(
                f"optitrainer was not tested with {', '.join(versions)}; {ALLOW_UNTESTED_ENV} is set, so "
                "training goes on (every hook optitrainer relies on is present)",
                stacklevel=3,
            )
        return
    ranges = ", ".join(f"{d}{s}" for d, s in SUPPORTED.items())
    lines = [
        f"optitrainer {_version('optitrainer') or ''} supports {ranges}; this environment has {_versions_line()}."
    ]
    lines += [f"  - outside the tested range: {v}" for v in versions]
    lines += [f"  - {h}" for h in hooks]
    fix = _pip_fix()
    if any(v.startswith("torch ") for v in versions):
        fix += f" and 'torch{SUPPORTED['torch']}' (the build for your CUDA, or the CPU build)"
    lines.append(f"Fix: {fix}.")
    if versions and not hooks:
        lines.append(
            f"To try an untested release anyway, set {ALLOW_UNTESTED_ENV}=1 (the hooks above are all present)."
        )
    raise UnsupportedVersionError("\n".join(lines))
