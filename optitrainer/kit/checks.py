"""The checks of the kit, and the plan of (form, check) items a run goes through."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .result import NOT_RUNNABLE, SKIPPED, CheckResult, outcome


@dataclass(frozen=True)
class Check:
    name: str
    #: what it proves, one line (``optitrainer check --list-checks``, docs/plugins.md)
    doc: str
    run: Callable[[object, Path], str | None]
    standard: bool = True
    layerwise: bool = False


def _imports(case, tmp):
    from ..registry import REGISTRY
    from .imports import check_upstream_imports

    return check_upstream_imports(REGISTRY.resolve(case.optim, check_installed=False).spec)


def _learns(case, tmp):
    from .learning import check_learns

    return check_learns(case, tmp)


def _modes(case, tmp):
    from .modes import check_train_eval_modes

    return check_train_eval_modes(case, tmp)


def _options(case, tmp):
    from .options_effect import check_options_take_effect

    return check_options_take_effect(case, tmp)


def _refusals(case, tmp):
    from ..testing import check_refusals

    return check_refusals(case)


def _resume(case, tmp):
    from ..testing import check_resume

    check_resume(case, tmp)
    return "resumed == uninterrupted, bit for bit; optimizer.pt loads with weights_only=True"


def _scheduled_lr(case, tmp):
    from ..testing import check_scheduled_lr_reaches_update

    check_scheduled_lr_reaches_update(case, tmp)
    return "lr 0 on step 1 leaves the weights, later steps move them"


def _layerwise(case, tmp):
    from ..testing import check_layerwise_matches_standard

    check_layerwise_matches_standard(case, tmp)
    return "same losses and weights as the standard form, bit for bit"


def _accumulation(case, tmp):
    from .capabilities import check_gradient_accumulation

    return check_gradient_accumulation(case, tmp)


def _fp16(case, tmp):
    from .capabilities import check_fp16

    return check_fp16(case, tmp)


CHECKS: tuple[Check, ...] = (
    Check(
        "imports",
        "the plugin loads and every module of `imports` imports (absent upstream: skipped)",
        _imports,
    ),
    Check(
        "learns",
        "the loss falls over 16 steps at recommended_lr (else the first of lr 1e-3, 1e-2, 1e-1)",
        _learns,
    ),
    Check(
        "train_eval_modes",
        "train()/eval() present iff train_eval_modes is declared; eval/train round-trip",
        _modes,
    ),
    Check(
        "options",
        "each option set to a non-default value reaches the optimizer or changes its first update",
        _options,
    ),
    Check(
        "refusals",
        "validate/validate_arguments run clean on defaults; what the flags rule out is refused",
        _refusals,
        layerwise=True,
    ),
    Check(
        "resume",
        "save + resume == uninterrupted, bit for bit; optimizer.pt loads with weights_only=True",
        _resume,
        layerwise=True,
    ),
    Check(
        "scheduled_lr",
        "the scheduled learning rate reaches the update (lr 0 moves nothing)",
        _scheduled_lr,
        layerwise=True,
    ),
    Check(
        "layerwise_exact",
        "<name>_layerwise == <name>, bit for bit",
        _layerwise,
        standard=False,
        layerwise=True,
    ),
    Check(
        "accumulation",
        "if claimed: 2 accumulated micro-batches == one batch of twice the size",
        _accumulation,
        layerwise=True,
    ),
    Check("fp16", "if claimed: fp16=True (GradScaler) tracks the float32 run", _fp16),
)
CHECK_NAMES = tuple(c.name for c in CHECKS)
#: checks a sampled run (CI) leaves out for ``_layerwise`` forms
SAMPLED_OUT_FOR_LAYERWISE = frozenset({"accumulation"})


@dataclass(frozen=True, eq=False)
class PlanItem:
    """One (form, check) of a run; ``batch`` holds every distributed run of the same plan (one launch)."""

    case: object
    check: str
    skip: str | None = None
    not_runnable: str | None = None
    batch: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.case.optim}::{self.check}"

    @property
    def distributed(self) -> bool:
        return self.check.startswith("distributed:")


def build_plan(
    cases, *, distributed_sample: set[tuple[str, str]] | None = None, checks=None
) -> list[PlanItem]:
    """Every applicable (form, check); ``distributed_sample`` limits the distributed runs (sampled CI)."""
    from ..compat import supported_engines
    from ..plugin import ENGINE_MODES
    from ..registry import LAYERWISE_SUFFIX, REGISTRY
    from .distributed import DistributedRun, check_name, not_runnable_reason

    wanted = set(checks) if checks else None
    items: list[PlanItem] = []
    pending: list[tuple[PlanItem, DistributedRun]] = []
    for case in cases:
        layerwise = case.optim.endswith(LAYERWISE_SUFFIX)
        skip = case.skip
        for check in CHECKS:
            if not (check.layerwise if layerwise else check.standard):
                continue
            if wanted is not None and check.name not in wanted:
                continue
            item_skip = skip
            if getattr(case, "error", None) and check.name != "imports":
                item_skip = "the plugin failed to load (see the imports check)"
            elif distributed_sample is not None and layerwise and check.name in SAMPLED_OUT_FOR_LAYERWISE:
                item_skip = item_skip or (
                    "sampled out of the default run: the layerwise engine's accumulation is the core's, the same "
                    "for every plugin (OPTITRAINER_CHECK_ALL=1 runs it)"
                )
            items.append(PlanItem(case, check.name, item_skip))
        if wanted is not None and "distributed" not in wanted:
            continue
        if skip or getattr(case, "error", None):
            continue
        engines = supported_engines(REGISTRY.resolve(case.optim, check_installed=False))
        for engine in (m for m in ENGINE_MODES if m in engines):
            reason = not_runnable_reason(engine)
            sampled_out = distributed_sample is not None and (case.optim, engine) not in distributed_sample
            item = PlanItem(
                case,
                check_name(engine),
                skip="sampled out of the default run (OPTITRAINER_CHECK_ALL=1 runs it)"
                if sampled_out and not reason
                else None,
                not_runnable=reason,
            )
            if reason or sampled_out:
                items.append(item)
            else:
                pending.append((item, DistributedRun(case.optim, engine, dict(case.args))))
    batch = tuple(run for _, run in pending)
    items += [PlanItem(i.case, i.check, batch=batch) for i, _ in pending]
    return items


def run_item(item: PlanItem, tmp_dir) -> CheckResult:
    """Run one non-distributed item (distributed ones: :func:`optitrainer.kit.runner.run_plan`)."""
    if item.skip:
        return CheckResult(item.case.optim, item.check, SKIPPED, item.skip)
    if item.not_runnable:
        return CheckResult(item.case.optim, item.check, NOT_RUNNABLE, item.not_runnable)
    if item.check == "imports" and getattr(item.case, "error", None):
        return outcome(item.case.optim, item.check, lambda: _raise(item.case.error))
    check = next(c for c in CHECKS if c.name == item.check)
    return outcome(item.case.optim, item.check, lambda: check.run(item.case, Path(tmp_dir)))


def _raise(error: str):
    raise AssertionError(f"the plugin failed to load: {error}")
