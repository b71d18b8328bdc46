"""Does the optimizer learn? The loss must fall over a short run at the spec's learning rate, without
first blowing up (a spike that comes back is not learning)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

#: tried in order when the spec declares no ``recommended_lr``; the first that learns passes
LR_SWEEP = (1e-3, 1e-2, 1e-1)
STEPS = 16
#: one longer run, at the best learning rate tried, before concluding that it does not learn (a slow
#: starter such as Prodigy estimates its step size first)
LONG_STEPS = 48
#: the mean of the last 3 logged losses must be this fraction below the mean of the first 3. Measured on
#: the tiny Llama, constant lr, 16 steps: AdamW 1e-3 3.6 %, SGD+momentum 0.1 13.6 % (1e-3: 0.3 %),
#: Lion 1e-3 4.1 %; step-to-step noise of the 3-step means stays under 1 %.
MIN_DROP = 0.02
#: no logged loss may exceed the first (the untrained model's) by more than this factor
MAX_RISE = 1.5


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _run(case, out, lr: float, steps: int) -> tuple[bool, float, float]:
    from ..testing import run_training

    args = {**case.args, "learning_rate": lr, "lr_scheduler_type": "constant"}
    run = run_training(case.optim, out, steps=steps, **args)
    first, last = _mean(run.losses[:3]), _mean(run.losses[-3:])
    # a blow-up in steps 2-3 inflates the first mean, and a loss that spikes far above the untrained
    # model's and comes back (or collapses to nonsense, below what noisy data allows) is not learning
    stable = max(run.losses) <= MAX_RISE * run.losses[0]
    learned = last < first * (1 - MIN_DROP) and last < run.losses[0] and stable
    return all(math.isfinite(x) for x in run.losses) and learned, first, last


def check_learns(case, tmp_dir) -> str:
    """It learns at ``recommended_lr`` (else somewhere in the sweep), and at both ends of a declared
    ``learning_rate_range``."""
    from ..registry import REGISTRY

    spec = REGISTRY.resolve(case.optim, check_installed=False).spec
    found = _check_learns_somewhere(case, tmp_dir)
    if spec.learning_rate_range is None:
        return found
    for end in spec.learning_rate_range:
        learned, first, last = _run(case, Path(tmp_dir) / f"end{end:g}", end, LONG_STEPS)
        if not learned:
            raise AssertionError(
                f"{case.optim} declares learning_rate_range={spec.learning_rate_range} but does not learn at "
                f"{end:g} ({first:.3f} -> {last:.3f} in {LONG_STEPS} steps): measure it again with "
                f"`optitrainer check {spec.name} --measure-lr` and declare what it prints"
            )
    low, high = spec.learning_rate_range
    return f"{found}; learns at both ends of learning_rate_range ({low:g}, {high:g}) in {LONG_STEPS} steps"


def _check_learns_somewhere(case, tmp_dir) -> str:
    from ..errors import IncompatibleConfigError
    from ..registry import REGISTRY

    resolved = REGISTRY.resolve(case.optim, check_installed=False)
    spec = resolved.spec
    if spec.recommended_lr:
        lrs: tuple[float, ...] = (spec.recommended_lr,)
    else:  # three decades from the smallest rate of the sweep the plugin's validators accept
        from ..testing import _validation_lr

        start = _validation_lr(resolved)
        lrs = tuple(float(f"{start * 10**k:g}") for k in range(len(LR_SWEEP)))
    tried, best = [], None
    for lr in lrs:
        try:
            learned, first, last = _run(case, Path(tmp_dir) / f"lr{lr:g}", lr, STEPS)
        except IncompatibleConfigError as exc:
            if spec.recommended_lr:
                raise
            # its own validator refuses this rate (a plugin written before recommended_lr existed)
            tried.append(f"lr {lr:g}: refused by the plugin ({exc})")
            continue
        if learned:
            return f"loss {first:.3f} -> {last:.3f} in {STEPS} steps at lr {lr:g}"
        tried.append(f"lr {lr:g}: {first:.3f} -> {last:.3f} in {STEPS} steps")
        if math.isfinite(last) and last < first and (best is None or last / first < best[1]):
            best = (lr, last / first)
    if best is not None:  # it went down a little: once more, longer
        lr = best[0]
        learned, first, last = _run(case, Path(tmp_dir) / f"lr{lr:g}-long", lr, LONG_STEPS)
        if learned:
            return f"loss {first:.3f} -> {last:.3f} in {LONG_STEPS} steps at lr {lr:g} (not in {STEPS})"
        tried.append(f"lr {lr:g}: {first:.3f} -> {last:.3f} in {LONG_STEPS} steps")
    where = (
        "its recommended_lr"
        if spec.recommended_lr
        else "any lr of the sweep (no recommended_lr declared; three decades from the first rate it accepts)"
    )
    raise AssertionError(
        f"{case.optim} does not learn at {where}: the mean loss of the first/last 3 steps on the tiny Llama "
        f"(constant lr) must fall by {MIN_DROP:.0%}, ending below the first loss and never above {MAX_RISE:g} x "
        "it; got " + "; ".join(tried) + ". A rising loss means the "
        "update goes uphill (a sign error, maximize=True); a flat one, a learning rate far from the method's: "
        "declare OptimizerSpec(recommended_lr=...)"
    )


#: the learning rates ``measure_learning_rate_range`` walks through: 1-2-5 steps per decade
_GRID_PER_DECADE = (1.0, 2.0, 5.0)
#: how far the walk goes each way from the start, in grid steps (four decades)
_GRID_REACH = 12


def _grid_from(start: float, direction: int) -> list[float]:
    """The 1-2-5 grid rates beyond ``start`` going up (``+1``) or down (``-1``)."""
    exponent = math.floor(math.log10(start))
    grid = [m * 10.0**e for e in range(exponent - 5, exponent + 6) for m in _GRID_PER_DECADE]
    grid = [float(f"{g:.3g}") for g in grid]
    beyond = [g for g in grid if (g > start * 1.0001 if direction > 0 else g < start / 1.0001)]
    return sorted(beyond, reverse=direction < 0)[:_GRID_REACH]


@dataclass(frozen=True)
class LearningRateRange:
    """Where an optimizer learned in the kit's run (:data:`LONG_STEPS` steps, constant lr, tiny Llama)."""

    low: float
    high: float
    #: the nearest rates of the grid that did not learn (``None``: the walk's reach ended first)
    failed_below: float | None
    failed_above: float | None
    steps: int

    def spec_line(self) -> str:
        return f"learning_rate_range=({self.low:g}, {self.high:g})"


def measure_learning_rate_range(case, tmp_dir, *, start: float, steps: int = LONG_STEPS) -> LearningRateRange:
    """Walk the 1-2-5 grid down and up from ``start`` (a rate that learns) until the optimizer stops
    learning, by the ``learns`` check's criterion over ``steps`` steps."""
    learned, first, last = _run(case, Path(tmp_dir) / f"range{start:g}", start, steps)
    if not learned:
        raise AssertionError(
            f"{case.optim} does not learn at the starting rate {start:g} ({first:.3f} -> {last:.3f} in "
            f"{steps} steps): start from a rate that learns"
        )
    ends: dict[int, tuple[float, float | None]] = {}
    for direction in (-1, 1):
        good, bad = start, None
        for lr in _grid_from(start, direction):
            if _run(case, Path(tmp_dir) / f"range{lr:g}", lr, steps)[0]:
                good = lr
            else:
                bad = lr
                break
        ends[direction] = (good, bad)
    return LearningRateRange(ends[-1][0], ends[1][0], ends[-1][1], ends[1][1], steps)
