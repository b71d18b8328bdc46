"""Sharded checkpoints of the layerwise engine through ``torch.distributed.checkpoint`` (DCP).

Under FSDP2 the inner optimizers' states hold DTensor shards; DCP saves each rank's shards and loads
them in place, so the state dict to load into must already hold tensors of the right shapes:
:meth:`LayerwiseOptimizer.init_state` creates them (the weights are left untouched). Without it a
fresh engine's state dict has no state tensors and DCP loads none, silently.

accelerate's ``save_fsdp_optimizer``/``load_fsdp_optimizer`` cannot be used for the layerwise engine:
they go through ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, which expects
torch's ``{"state", "param_groups"}`` layout (it raises ``KeyError: 'state'`` on the engine's
``{"layerwise", "param_groups"}``, after leaving zero gradients on every parameter).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .layerwise import LayerwiseOptimizer


def _state(engine: LayerwiseOptimizer, model: nn.Module | None) -> dict[str, Any]:
    state: dict[str, Any] = {"optimizer": engine.state_dict()}
    if model is not None:
        state["model"] = model.state_dict()
    return state


def save_sharded(
    checkpoint_id: str | os.PathLike, engine: LayerwiseOptimizer, model: nn.Module | None = None
) -> None:
    """Save the engine's state (and ``model``'s, when given), each rank its own shards."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(engine, model), checkpoint_id=checkpoint_id)


def load_sharded(
    checkpoint_id: str | os.PathLike, engine: LayerwiseOptimizer, model: nn.Module | None = None
) -> None:
    """Load what :func:`save_sharded` saved into a freshly built engine (and ``model``), in place."""
    import torch.distributed.checkpoint as dcp

    engine.init_state()
    state = _state(engine, model)
    dcp.load(state, checkpoint_id=checkpoint_id)
    if model is not None:
        model.load_state_dict(state["model"])
    engine.load_state_dict(state["optimizer"])
