"""One ``torch.optim.Optimizer`` that runs torch's Muon on some groups and AdamW on the others."""

from __future__ import annotations

from typing import Any

import torch


class MuonWithAuxAdamW(torch.optim.Optimizer):
    """Muon for hidden weight matrices, AdamW for the rest, behind one real optimizer.

    The param groups (and the state) are shared with the two inner optimizers, so the trainer's
    scheduler, logging and checkpointing see one ordinary optimizer.
    """

    def __init__(
        self,
        muon_groups: list[dict[str, Any]],
        adamw_groups: list[dict[str, Any]],
        lr: float,
        muon_kwargs: dict[str, Any],
        adamw_kwargs: dict[str, Any],
    ) -> None:
        self._inner: list[torch.optim.Optimizer] = []
        if muon_groups:
            self._inner.append(torch.optim.Muon(muon_groups, lr=lr, **muon_kwargs))
        if adamw_groups:
            self._inner.append(torch.optim.AdamW(adamw_groups, lr=lr, **adamw_kwargs))
        groups = []
        for opt in self._inner:
            for g in opt.param_groups:
                g["use_muon"] = isinstance(opt, torch.optim.Muon)
                groups.append(g)
        super().__init__(groups, defaults={"lr": lr})
        self._rebind()

    def _rebind(self) -> None:
        # the inner optimizers step on the very dicts the scheduler edits and the state we save
        for opt in self._inner:
            is_muon = isinstance(opt, torch.optim.Muon)
            opt.param_groups = [g for g in self.param_groups if g["use_muon"] == is_muon]
            opt.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._rebind()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._inner:
            opt.step()
        return loss
