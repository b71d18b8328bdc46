"""``APOLLOAdamW``: apollo-torch's optimizer with resumable state and explicit projection seeds.

Upstream (``apollo_torch.APOLLOAdamW``, 1.0.3) keeps one projector *object* per projected weight in
``optimizer.state`` (``state[p]["projector"]``): a ``GradientProjector`` (random projection) or a
``GaLoreProjector`` (SVD). ``torch.save`` pickles it, but ``torch.load(..., weights_only=True)`` --
which is how ``transformers.Trainer`` reloads a checkpoint -- refuses it, so training cannot resume.

This subclass runs upstream's ``step`` unchanged (the numbers are upstream's by construction). Between
steps it keeps each projector as a plain dict of its *changing* fields -- the orthogonal matrix (a
tensor), the next projection seed and the refresh count (ints) -- and rebuilds the projector object
from that dict and the group's hyperparameters just for the duration of ``step``. So
``optimizer.state`` and ``state_dict()`` hold only tensors and numbers, load with
``weights_only=True``, and a resumed run draws exactly the projections the uninterrupted one draws.
(Strings are deliberately kept out of the per-parameter state: ``Optimizer.load_state_dict`` rebuilds
any iterable value with ``type(value)(generator)``, which turns a string into garbage; the string
hyperparameters live in the param groups, which it restores as they were.)

A closure passed to ``step`` is evaluated with gradients enabled, as torch's optimizers do (upstream
evaluates it under ``torch.no_grad()``, so a closure that calls ``backward()`` fails).

Projection seeds: upstream seeds parameter ``p``'s random projection with ``p``'s 1-based position in
the flattened param groups of *its* optimizer. ``seeds=`` sets them explicitly, so one optimizer per
parameter (layerwise) can draw the very projections of the one-optimizer form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from apollo_torch import APOLLOAdamW as _UpstreamAPOLLOAdamW

__all__ = ["APOLLOAdamW", "PROJECTOR_FIELDS"]

#: the projector attributes that change during training (everything else comes from the param group)
PROJECTOR_FIELDS = ("ortho_matrix", "seed", "svd_count")


class APOLLOAdamW(_UpstreamAPOLLOAdamW):
    """``apollo_torch.APOLLOAdamW`` whose state is plain tensors and numbers.

    Args:
        params: parameters or param groups; groups with a ``rank`` key are projected (APOLLO), the
            others get upstream's plain AdamW update. Projected groups also need ``proj``,
            ``scale_type``, ``scale``, ``update_proj_gap`` and ``proj_type``.
        seeds: the projection seed of each parameter, in the order of the flattened param groups
            (``None``: upstream's seeds, the 1-based positions).
        **kwargs: upstream's (``lr``, ``betas``, ``eps``, ``weight_decay``, ``correct_bias``,
            ``scale_front``, ``disable_nl``).
    """

    def __init__(self, params, *, seeds: Sequence[int] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        if seeds is not None:
            flat = [p for g in self.param_groups for p in g["params"]]
            if len(seeds) != len(flat):
                raise ValueError(f"seeds has {len(seeds)} entries for {len(flat)} parameters")
            for p, seed in zip(flat, seeds):
                if p.requires_grad:  # upstream seeds only trainable parameters
                    self.state[p]["seed"] = int(seed)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:  # upstream calls it under no_grad, where its backward cannot run
            with torch.enable_grad():
                loss = closure()
        self._inflate_projectors()
        try:
            super().step()
        finally:
            self._deflate_projectors()
        return loss

    # projector objects <-> plain dicts ---------------------------------------------------------------
    def _projected(self):
        for group in self.param_groups:
            if "rank" in group:
                for p in group["params"]:
                    yield group, p

    def _inflate_projectors(self) -> None:
        """Plain dicts -> upstream projector objects, built from the group's hyperparameters."""
        for group, p in self._projected():
            state = self.state.get(p)
            saved = state.get("projector") if state else None
            if isinstance(saved, dict):
                projector = self._initialize_projector(group, state)
                for key, value in saved.items():
                    setattr(projector, key, value)
                state["projector"] = projector

    def _deflate_projectors(self) -> None:
        """Upstream projector objects -> plain dicts of their changing fields."""
        for _, p in self._projected():
            state = self.state.get(p)
            projector = state.get("projector") if state else None
            if projector is not None and not isinstance(projector, dict):
                state["projector"] = {
                    k: getattr(projector, k) for k in PROJECTOR_FIELDS if hasattr(projector, k)
                }
