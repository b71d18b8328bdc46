"""Every declared option must do something: reach the built optimizer or change its first updates.

For each option, a non-default value (:mod:`.option_values`) is built next to the defaults, on the same
tiny model and the same batch. The option passes when the optimizer's hyperparameters (``defaults``,
``param_groups`` without the tensors, plain attributes and settings objects) differ, or else when the
weights after two updates differ (the second reads the state the first left: 8-bit states). A value
the plugin refuses (``validate``/``validate_arguments`` or the factory raising ``ValueError``), and a
value that changes nothing alone, are tried next on top of each other option's non-default values
(``max_lr`` acts only with ``decouple_lr=True``; a seed only with random block order); the baseline is
then that other value alone. An option every non-default value of which is refused on float32 weights
is tried on bfloat16 weights (an option for low-precision weights only, e.g. master-weight precision).
A value the parser accepts that crashes the first steps is a failure too.
"""

from __future__ import annotations

from typing import Any

import torch

from .option_values import non_default_values

_PLAIN = (bool, int, float, str, type(None))
UPDATES = 2


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else ("tensor", tuple(value.shape))
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "params"}
    return value if isinstance(value, _PLAIN) else type(value).__name__


def hyperparameters(optimizer: torch.optim.Optimizer, depth: int = 0) -> dict[str, Any]:
    """What an option may set on an optimizer, as plain values (nested optimizers included)."""
    out: dict[str, Any] = {
        "defaults": _plain(getattr(optimizer, "defaults", {})),
        "param_groups": [_plain(g) for g in optimizer.param_groups],
        "group_sizes": [len(g["params"]) for g in optimizer.param_groups],
    }
    for key, value in vars(optimizer).items():
        if key in ("defaults", "param_groups", "state") or key.startswith("_"):
            continue
        if isinstance(value, torch.optim.Optimizer) and depth < 2:
            out[key] = hyperparameters(value, depth + 1)
        elif isinstance(value, _PLAIN) or (
            isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)
        ):
            out[key] = value
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, torch.Tensor, type)):
            # a settings object (bitsandbytes keeps min_8bit_size, percentile_clipping... in optimizer.args)
            out[key] = {k: v for k, v in vars(value).items() if isinstance(v, _PLAIN)}
    return out


class _Refused(Exception):
    pass


def _updates(resolved, args, options: dict[str, Any], batch, dtype: torch.dtype | None = None):
    """(hyperparameters, weights after two updates) for ``options``; ``_Refused`` when the plugin refuses."""
    from ..plugin import BackwardContext, BuildContext
    from ..testing import tiny_llama

    spec = resolved.spec
    model = tiny_llama() if dtype is None else tiny_llama().to(dtype)
    ctx = BuildContext(model=model, args=args, options=options, name=spec.name)
    problems = list(spec.validate_arguments(args, options)) if spec.validate_arguments else []
    problems += list(spec.validate(ctx)) if spec.validate else []
    if problems:
        raise _Refused("; ".join(problems))
    try:
        optimizer = spec.factory(ctx)
    except (ValueError, TypeError) as exc:  # e.g. torch's SGD: nesterov needs momentum
        raise _Refused(f"the factory raised {type(exc).__name__}: {exc}") from exc
    hyper = hyperparameters(optimizer)
    if spec.capabilities.train_eval_modes:
        optimizer.train()
    for _ in range(UPDATES):
        loss = model(**batch).loss
        if spec.capabilities.owns_backward:
            bctx = BackwardContext(optimizer, loss, args.learning_rate, 0.0, model, accelerator=None)
            spec.backward(bctx)
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return hyper, {n: p.detach().clone() for n, p in model.named_parameters()}


def _differs(a, b) -> str | None:
    if a[0] != b[0]:
        return "reaches the optimizer's hyperparameters"
    diff = max(float((a[1][n] - b[1][n]).abs().max()) for n in a[1])
    return f"changes the first {UPDATES} updates (by up to {diff:.3g})" if diff > 0 else None


def check_options_take_effect(case, tmp_dir) -> str:
    from ..registry import REGISTRY
    from ..testing import SyntheticLMDataset, training_arguments

    resolved = REGISTRY.resolve(case.optim, check_installed=False)
    spec = resolved.spec
    if not spec.options:
        return "declares no option"
    args = training_arguments(tmp_dir, optim=spec.name, **case.args)
    defaults = {o.name: o.default for o in spec.options}
    data = SyntheticLMDataset(n=2)
    batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in data[0]}
    base = _updates(resolved, args, defaults, batch)
    found, dead, refused, crashed = [], [], [], []
    for opt in spec.options:
        tried, effect = [], None
        for value in non_default_values(spec, opt):
            try:
                effect = _differs(base, _updates(resolved, args, {**defaults, opt.name: value}, batch))
            except _Refused as exc:
                refused.append(f"{opt.name}={value!r}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - a value the parser accepts must train
                crashed.append(f"{opt.name}={value!r}: {type(exc).__name__}: {exc}")
                continue
            tried.append(repr(value))
            if effect:
                found.append(f"{opt.name}={value!r} {effect}")
                break
        if effect is None:
            effect = _with_another_option(resolved, args, defaults, batch, opt)
            if effect is None and not tried:
                effect = _on_low_precision_weights(resolved, args, defaults, batch, opt)
            if effect:
                found.append(effect)
                continue
            mine = [r for r in refused if r.startswith(f"{opt.name}=")]
            dead.append(
                f"{opt.name} (tried {', '.join(tried)})"
                if tried
                else f"{opt.name} (every non-default value was refused: {'; '.join(mine[-2:]) or 'none exists'})"
            )
    assert not crashed, (
        f"{spec.name}: option values the parser accepts crash the first steps: {'; '.join(crashed)}. Refuse "
        "them in validate/validate_arguments (or narrow the Option's choices/bounds), or make them work"
    )
    assert not dead, (
        f"{spec.name}: option(s) that change nothing -- neither the built optimizer's hyperparameters nor its "
        f"first {UPDATES} updates on the tiny Llama, alone or with another option changed: {'; '.join(dead)}. "
        "Pass each option to the optimizer in the factory, or remove it from OptimizerSpec.options"
    )
    return "; ".join(found)


def _on_low_precision_weights(resolved, args, defaults, batch, opt) -> str | None:
    """An option refused on float32 weights may be one for bfloat16 weights only (master-weight precision)."""
    spec = resolved.spec
    try:
        base = _updates(resolved, args, defaults, batch, dtype=torch.bfloat16)
    except Exception:  # noqa: BLE001 - the optimizer does not run on bfloat16 weights at all
        return None
    for value in non_default_values(spec, opt):
        try:
            effect = _differs(
                base, _updates(resolved, args, {**defaults, opt.name: value}, batch, torch.bfloat16)
            )
        except Exception:  # noqa: BLE001 - refused there too: the option is reported as changing nothing
            continue
        if effect:
            return f"{opt.name}={value!r} {effect} on bfloat16 weights (refused on float32 ones)"
    return None


def _with_another_option(resolved, args, defaults, batch, opt) -> str | None:
    spec = resolved.spec
    for other in spec.options:
        if other.name == opt.name:
            continue
        for other_value in non_default_values(spec, other)[:4]:
            start = {**defaults, other.name: other_value}
            try:
                base = _updates(resolved, args, start, batch)
            except Exception:  # noqa: BLE001 - refused or crashing: reported for that option itself
                continue
            for value in non_default_values(spec, opt):
                try:
                    effect = _differs(base, _updates(resolved, args, {**start, opt.name: value}, batch))
                except Exception:  # noqa: BLE001 - refused or crashing here: the option alone says so
                    continue
                if effect:
                    return f"{opt.name}={value!r} (with {other.name}={other_value!r}) {effect}"
    return None
