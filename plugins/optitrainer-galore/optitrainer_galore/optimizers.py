"""galore-torch's optimizers with a checkpoint made of tensors and numbers.

Upstream (galore-torch 1.0) keeps a ``GaLoreProjector`` object in the state of every projected
parameter. ``torch.save`` pickles it, but ``torch.load(..., weights_only=True)`` -- what
``transformers.Trainer`` uses to resume -- refuses to unpickle it, so a GaLore run cannot resume.

The subclasses below leave ``step`` untouched (the update's numbers are upstream's, bit for bit) and
only change the serialized form: ``state_dict()`` replaces the projector by its orthogonal matrix
(a tensor; a ``[left, right]`` pair for ``proj_type='full'``) under :data:`ORTHO_KEY`, and
``load_state_dict()`` rebuilds the projector from that matrix and the group's
``rank``/``update_proj_gap``/``scale``/``proj_type`` (which the checkpoint also holds). The
projector's only other attribute, ``verbose``, is unused upstream.
"""

from __future__ import annotations

from typing import Any

from galore_torch import GaLoreAdafactor as _UpstreamAdafactor
from galore_torch import GaLoreAdamW as _UpstreamAdamW
from galore_torch import GaLoreAdamW8bit as _UpstreamAdamW8bit
from galore_torch.galore_projector import GaLoreProjector

__all__ = ["ORTHO_KEY", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit"]

#: the state key that holds the projector's orthogonal matrix in a checkpoint
ORTHO_KEY = "galore_ortho_matrix"


class _PlainProjectorState:
    """Mixin: serialize ``state['projector']`` as its orthogonal matrix and rebuild it on load."""

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        state = {}
        for key, param_state in sd["state"].items():
            if isinstance(param_state, dict) and "projector" in param_state:
                # torch's state_dict shares the live per-parameter dicts: copy before editing
                param_state = dict(param_state)
                projector = param_state.pop("projector")
                param_state[ORTHO_KEY] = projector.ortho_matrix
            state[key] = param_state
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        super().load_state_dict(state_dict, *args, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                param_state = self.state.get(p)
                if not param_state or ORTHO_KEY not in param_state:
                    continue
                projector = GaLoreProjector(
                    group["rank"],
                    update_proj_gap=group["update_proj_gap"],
                    scale=group["scale"],
                    proj_type=group["proj_type"],
                )
                projector.ortho_matrix = param_state.pop(ORTHO_KEY)
                param_state["projector"] = projector


class GaLoreAdamW(_PlainProjectorState, _UpstreamAdamW):
    """``galore_torch.GaLoreAdamW`` whose checkpoint loads with ``weights_only=True``."""

    def __init__(self, params, **kwargs: Any) -> None:
        kwargs.setdefault("no_deprecation_warning", True)  # upstream warns once per instance otherwise
        super().__init__(params, **kwargs)


class GaLoreAdafactor(_PlainProjectorState, _UpstreamAdafactor):
    """``galore_torch.GaLoreAdafactor`` whose checkpoint loads with ``weights_only=True``."""


class GaLoreAdamW8bit(_PlainProjectorState, _UpstreamAdamW8bit):
    """``galore_torch.GaLoreAdamW8bit`` whose checkpoint loads with ``weights_only=True``.

    Its step calls ``torch.cuda.synchronize()`` (upstream): it needs a CUDA device.
    """
