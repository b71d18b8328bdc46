"""Plain ``torch.optim.Optimizer`` classes the defective specs build (one defect each)."""

from __future__ import annotations

import dataclasses

import torch


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): ``p -= lr * sign(b1 * m + (1 - b1) * g)``; ``maximize`` flips the gradient."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        super().__init__(
            params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize}
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + g * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(g, alpha=1 - b2)


class FrozenLrSGD(torch.optim.SGD):
    """SGD that keeps the learning rate it was built with: the scheduler's changes never reach it."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.initial_lr = lr

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-self.initial_lr)


class CountingSGD(torch.optim.SGD):
    """SGD with a 1/(1+t) decay counted in an attribute that ``state_dict`` does not hold."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.t = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] / (1 + 0.5 * self.t))


@dataclasses.dataclass
class Stats:
    steps: int = 0


class ObjectStateSGD(torch.optim.SGD):
    """SGD keeping a Python object in its state: ``torch.load(weights_only=True)`` refuses it."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                stats = self.state[p].setdefault("stats", Stats())
                stats.steps += 1


class GlobalNormSGD(torch.optim.SGD):
    """SGD on the gradient divided by the norm of ALL gradients: global state, not layerwise."""

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        total = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)) + 1e-12
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad / total, alpha=-group["lr"])


class LastMicroBatchSGD(torch.optim.SGD):
    """SGD on the gradient of the last backward pass only (captured by a hook), not the accumulated one."""

    def __init__(self, params, lr, momentum=0.0):
        super().__init__(params, lr=lr, momentum=momentum)
        self.seen: dict[int, torch.Tensor] = {}
        self.previous: dict[int, torch.Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                p.register_post_accumulate_grad_hook(self._capture)

    def _capture(self, p):
        # .grad holds the running sum; this micro-batch's gradient is the difference to the last one
        before = self.previous.get(id(p))
        self.seen[id(p)] = p.grad.detach().clone() - (before if before is not None else 0)
        self.previous[id(p)] = p.grad.detach().clone()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self.seen:
                    p.add_(self.seen[id(p)], alpha=-group["lr"])
        self.seen.clear()
        self.previous.clear()


class FusedSGD(torch.optim.SGD):
    """SGD applied inside backward, from each parameter's gradient hook (a fused-backward plugin)."""

    def fused_backward(self, loss, lr, average_gradient=None):
        handles = []

        def update(p):
            if average_gradient is not None:
                average_gradient(p.grad)
            with torch.no_grad():
                p.add_(p.grad, alpha=-lr)
            p.grad = None

        for group in self.param_groups:
            for p in group["params"]:
                handles.append(p.register_post_accumulate_grad_hook(update))
        try:
            loss.backward()
        finally:
            for h in handles:
                h.remove()


class SpikeThenUndoSGD(torch.optim.SGD):
    """Shakes the weights hard on its second step and puts them back on the third: no learning at all,
    but the loss spikes in steps 2-3, so the first 3 logged losses average far above the last 3."""

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        count = self.state.setdefault("calls", 0) + 1  # not per parameter: a plain counter is enough here
        self.state["calls"] = count
        if count == 1:
            self.state["saved"] = [p.detach().clone() for p in params]
        elif count == 2:
            gen = torch.Generator().manual_seed(0)
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        else:
            for p, saved in zip(params, self.state["saved"]):
                p.copy_(saved)
        return None
