"""The layerwise engine: any layerwise-capable plugin as optimizer-in-backward.

One optimizer per parameter, stepped from a post-accumulate-grad hook; the gradient is freed right
after, so without accumulation at most one parameter's gradient is alive at a time. Nothing reads it
after the step, so an optimizer built with ``ctx.layerwise`` may write over it (GaLore's and APOLLO's
plugins put their full-size update there instead of allocating one). The trainer sees
:class:`LayerwiseOptimizer`, a real ``torch.optim.Optimizer`` whose param groups (one per parameter)
the scheduler moves and the hooks read, so the scheduled learning rate is the one applied and logged.

Gradient accumulation: the hooks only step on the last micro-batch of an optimizer step; until then
gradients accumulate as usual (so memory holds every gradient during accumulation).

Gradient clipping (``max_grad_norm > 0``) is exact (:meth:`LayerwiseOptimizer.backward`): a norm pass
measures the global gradient norm, freeing each gradient once its norm is taken; then every parameter
is updated with its gradient scaled by ``torch.nn.utils.clip_grad_norm_``'s coefficient. Given the
model, the update pass needs no second backward for ``nn.Linear``/``nn.Embedding`` weights: their
gradients are rebuilt from the inputs and output gradients recorded in the norm pass, one matmul each
(:mod:`optitrainer.clipping`, ≈ 1.33 × an unclipped step instead of ≈ 1.67 ×); vectors keep their
norm-pass gradient; other parameters get a second backward over the same graph (``inputs=`` them).
The trainer's ``training_step`` (forward, loss, counters) runs once per micro-batch. With accumulation,
every gradient is alive at the last micro-batch anyway: its hooks average and measure them, and the
clipped updates follow that one backward (:meth:`LayerwiseOptimizer._backward_holding`).

Two clipping schemes (``clipping``): ``"rebuild"``, above, keeps the engine's memory bound (no gradient
outlives its norm); ``"hold"`` runs one backward whose hooks average, measure and keep every gradient,
then updates them all: the memory of one gradient copy (what accumulation holds anyway, and under FSDP2
only each rank's shard) for no rebuild, no second pass and, under DDP, one round of communication
instead of two.

fp16 loss scaling is refused: the per-parameter step would see scaled gradients.

Many processes: under DDP the trainer turns DDP's reduction off for the step and each hook averages
its gradient across ranks (``average_gradient``) before the update, so every rank steps on the
averaged gradient and frees it right after; accumulation communicates on the last micro-batch only,
and the norm pass of exact clipping measures the averaged gradients (so the global norm is the same
on every rank). Under FSDP2 the hooks receive the reduce-scattered shard of each gradient; the
optimizer steps on the shard, and the clipping norm sums the shards' squares across ranks. With
``set_requires_gradient_sync(False)`` on the micro-batches before the last (accelerate's ``no_sync``)
FSDP2 calls no hook until the last one. The engine may be built before the model is sharded (the
Trainer's order): the inner optimizers follow the sharded parameters that replace the built ones in
the param groups (see ``_follow_params``). Sharded checkpoints: :mod:`optitrainer.distributed_checkpoint`
(DCP, each rank its shards of the inner states; :meth:`LayerwiseOptimizer.init_state` first creates the
state a checkpoint loads into).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .clipping import GradientRebuilder, activation_checkpointing, check_rebuilt
from .compat import CLIPPING_SCHEMES
from .data_parallel import BucketedAverager
from .plugin import BuildContext, OptimizerSpec


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Facade over one optimizer per parameter. ``step``/``zero_grad`` are no-ops; hooks do the work."""

    def __init__(
        self,
        named_optimizers: list[tuple[str, nn.Parameter, torch.optim.Optimizer]],
        max_grad_norm: float,
        average_gradient: Callable[[torch.Tensor], None] | None = None,
        model: nn.Module | None = None,
        averager: BucketedAverager | None = None,
        clipping: str = "rebuild",
    ):
        if clipping not in CLIPPING_SCHEMES:
            raise ValueError(f"clipping={clipping!r}: use one of {CLIPPING_SCHEMES}")
        groups = []
        for name, param, inner in named_optimizers:
            lr = next(g["lr"] for g in inner.param_groups if any(q is param for q in g["params"]))
            groups.append({"params": [param], "lr": lr, "param_name": name})
        super().__init__(groups, defaults={"lr": groups[0]["lr"] if groups else 0.0})
        self.inner: dict[str, torch.optim.Optimizer] = {n: o for n, _, o in named_optimizers}
        #: the parameter each inner optimizer steps (see :meth:`_follow_params`)
        self._param_of: dict[str, nn.Parameter] = {n: p for n, p, _ in named_optimizers}
        self._group_of: dict[int, dict[str, Any]] = {id(g["params"][0]): g for g in self.param_groups}
        self._name_of: dict[int, str] = {id(p): n for n, p, _ in named_optimizers}
        # inner groups keep their ratio to the scheduled rate (1 unless a plugin scales a group)
        self._lr_ratio = {
            n: [g["lr"] / lr0 if lr0 else 1.0 for g in o.param_groups]
            for (n, _, o), lr0 in zip(named_optimizers, (g["lr"] for g in groups))
        }
        self.max_grad_norm = max_grad_norm
        #: averages a gradient across data-parallel ranks in place (DDP); ``None`` on one process
        self.average_gradient = average_gradient
        #: averages in buckets, overlapped with the rest of backward (DDP); replaces ``average_gradient``
        self.averager = averager
        self._handles: list[Any] = []
        self._sync = True
        self._measuring = False
        #: ``"rebuild"`` (norm pass, then rebuilt gradients: bounded memory) or ``"hold"`` (one backward,
        #: every gradient kept until the norm is known); accumulation always holds
        self.clipping = clipping
        self._holding = False  # clipping on held gradients: the hooks measure and keep them
        self._sq_norms: dict[str, torch.Tensor] = {}
        self._clip_coef: torch.Tensor | None = None
        #: the model whose Linear/Embedding weight gradients exact clipping rebuilds (None: two passes)
        self.model = model
        self._rebuilder: GradientRebuilder | None = None
        self._kept: dict[str, torch.Tensor] | None = None  # gradients kept from the norm pass
        #: the pre-clip global gradient norm of the last step, when one was measured
        self.last_grad_norm: float | None = None

    # hooks --------------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        self._follow_params()
        for group in self.param_groups:
            p = group["params"][0]
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        if self.model is not None and self.max_grad_norm > 0 and self.clipping == "rebuild":
            self._rebuilder = GradientRebuilder(self.model, [g["params"][0] for g in self.param_groups])

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._rebuilder is not None:
            self._rebuilder.close()
            self._rebuilder = None

    @torch.no_grad()
    def _hook(self, param: nn.Parameter) -> None:
        if param.grad is None:
            return
        name = self._name_of[id(param)]
        if not self._sync:
            return  # accumulating: keep the gradient for the next micro-batch
        if self._holding:  # accumulated clipping: every gradient is alive already; measured now, kept
            if self.averager is not None:
                self.averager.add(param.grad, functools.partial(self._averaged_into_grad, name, param))
                return
            if self.average_gradient is not None:
                self.average_gradient(param.grad)
            self._sq_norms[name] = torch.linalg.vector_norm(param.grad, 2.0)
            return
        if self.averager is not None:  # stepped when its bucket's average arrives
            grad, param.grad = param.grad, None
            self.averager.add(grad, functools.partial(self._averaged, name, param))
            return
        if self.average_gradient is not None:
            self.average_gradient(param.grad)
        self._consume(name, param)

    @torch.no_grad()
    def _averaged(self, name: str, param: nn.Parameter, average: torch.Tensor) -> None:
        # ``average`` is a view into a bucket reused after this call: what is kept is copied
        param.grad = (
            average.clone() if self._measuring and self._kept is not None and param.dim() <= 1 else average
        )
        self._consume(name, param)

    @torch.no_grad()
    def _averaged_into_grad(self, name: str, param: nn.Parameter, average: torch.Tensor) -> None:
        param.grad.copy_(average)
        self._sq_norms[name] = torch.linalg.vector_norm(param.grad, 2.0)

    def _consume(self, name: str, param: nn.Parameter) -> None:
        """Measure ``param.grad`` (norm pass) or step on it (update), then free it."""
        if self._measuring:
            self._sq_norms[name] = torch.linalg.vector_norm(param.grad, 2.0)
            if self._kept is not None and param.dim() <= 1:
                self._kept[name] = param.grad  # a vector: kept for the update instead of a second pass
            param.grad = None
            return
        self._update(name, param)

    def _run_backward(self, run_backward: Callable[..., None], loss: torch.Tensor, **kwargs: Any) -> None:
        """One backward pass, then the last buckets' averages (every hook's gradient is consumed after)."""
        if self.averager is not None:
            params = kwargs.get("inputs") or [g["params"][0] for g in self.param_groups]
            self.averager.expect(sum(p.numel() * p.element_size() for p in params if p.requires_grad))
        run_backward(loss, **kwargs)
        if self.averager is not None:
            self.averager.flush()

    @torch.no_grad()
    def _update(self, name: str, param: nn.Parameter) -> None:
        """Step ``param`` on its ``.grad`` (averaged already), scaled by the clip coefficient; free it."""
        if self._clip_coef is not None:
            param.grad.mul_(self._clip_coef.to(param.grad.device))
        inner = self.inner[name]
        lr = self._group_of[id(param)]["lr"]
        for g, ratio in zip(inner.param_groups, self._lr_ratio[name]):
            g["lr"] = lr * ratio
        inner.step()
        param.grad = None

    def _follow_params(self) -> None:
        """Point the inner optimizers (and their state) at the parameters now in the param groups.

        A wrapper may swap an optimizer's parameters after it was built: accelerate's FSDP2 preparation
        shards the model and replaces each ``param_groups[i]["params"]`` entry with the sharded
        parameter (``fsdp2_switch_optimizer_parameters``). The inner optimizers still hold the old ones.
        """
        for group in self.param_groups:
            name, new = group["param_name"], group["params"][0]
            old = self._param_of[name]
            if new is old:
                continue
            inner = self.inner[name]
            for g in inner.param_groups:
                g["params"] = [new if q is old else q for q in g["params"]]
            if old in inner.state:
                inner.state[new] = inner.state.pop(old)
            self._param_of[name] = new
            self._name_of.pop(id(old), None)
            self._group_of.pop(id(old), None)
            self._name_of[id(new)] = name
            self._group_of[id(new)] = group

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every inner optimizer's state now (a zero-gradient step at lr 0), weights untouched.

        ``Optimizer`` states are created lazily at the first step; a sharded checkpoint
        (``torch.distributed.checkpoint``) loads in place, into a state dict whose tensors already exist.
        Each parameter's weights and gradient are restored bit for bit afterwards, so an optimizer that
        moves weights even at lr 0 (decoupled decay on a relative step size, schedule-free averaging)
        leaves no trace; the state it created is meant to be overwritten by the load.
        """
        self._follow_params()
        for group in self.param_groups:
            name, p = group["param_name"], group["params"][0]
            inner = self.inner[name]
            if inner.state.get(p):
                continue
            weights, grad = p.detach().clone(), p.grad
            lrs = [g["lr"] for g in inner.param_groups]
            p.grad = torch.zeros_like(p)
            for g in inner.param_groups:
                g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
            try:
                inner.step()
            finally:
                for g, lr in zip(inner.param_groups, lrs):
                    g["lr"] = lr
                p.copy_(weights)
                p.grad = grad

    # one training step ---------------------------------------------------------------------------
    def begin_step(self, sync: bool, record: bool = True) -> None:
        """Before a micro-batch's forward/backward: hooks attached; ``sync``: the last micro-batch of a step.

        ``record``: record the forward for exact clipping's rebuilt gradients (see :meth:`backward`).
        """
        self.attach()
        self._sync = sync
        self._clip_coef = None
        if sync:
            self.last_grad_norm = None
        if self._rebuilder is not None:
            if record and self.clips and not activation_checkpointing(self.model):
                self._rebuilder.start()  # record this forward (checkpointing re-runs it: two passes)
            else:
                self._rebuilder.finish()

    @property
    def clips(self) -> bool:
        """Whether this micro-batch's backward clips (measures the global norm first)."""
        return self._sync and self.max_grad_norm > 0

    def backward(
        self, loss: torch.Tensor, run_backward: Callable[..., None] | None = None, **kwargs: Any
    ) -> None:
        """The backward pass of one micro-batch; with clipping, a norm pass and an update pass on one graph.

        ``run_backward(loss, **kwargs)`` is the backward to run (the trainer passes its accelerator's;
        default ``loss.backward``). With clipping the first pass only measures the global norm, freeing each
        gradient as soon as its norm is taken; then every parameter steps with ``clip_grad_norm_``'s
        coefficient: Linear/Embedding weights on gradients rebuilt from the recorded forward (when the
        engine knows the model and :meth:`begin_step` recorded), vectors on their norm-pass gradients, the
        rest through a second backward over the same graph (``retain_graph=True`` in the first). The
        forward runs once: nothing the trainer's step counts or draws (token counters, dropout masks,
        generations) is repeated.
        """
        if run_backward is None:
            run_backward = _plain_backward
        if not self.clips:
            self._run_backward(run_backward, loss, **kwargs)
            return
        if self.clipping == "hold" or any(g["params"][0].grad is not None for g in self.param_groups):
            self._backward_holding(loss, run_backward, **kwargs)
            return
        if self._can_rebuild():
            self._backward_rebuilding(loss, run_backward, **kwargs)
            return
        self._measuring, self._sq_norms = True, {}
        try:
            self._run_backward(run_backward, loss, **{**kwargs, "retain_graph": True})
        finally:
            self._measuring = False
        self._set_clip_coef()
        try:
            self._run_backward(run_backward, loss, **kwargs)
        finally:
            self._clip_coef = None

    def _backward_holding(self, loss: torch.Tensor, run_backward: Callable[..., None], **kwargs: Any) -> None:
        """Clipped with every gradient held: one backward, then every update.

        The hooks only average and measure the gradients, and the updates follow with
        ``clip_grad_norm_``'s coefficient: no second pass. Used after accumulation (which holds every
        gradient until this backward anyway) and for ``clipping="hold"``.
        """
        self._holding, self._sq_norms = True, {}
        try:
            self._run_backward(run_backward, loss, **kwargs)
        finally:
            self._holding = False
        self._update_held()

    def _update_held(self) -> None:
        try:
            self._set_clip_coef()
            for group in self.param_groups:
                name, p = group["param_name"], group["params"][0]
                if name in self._sq_norms and p.grad is not None:
                    self._update(name, p)
        finally:
            self._clip_coef = None

    def _can_rebuild(self) -> bool:
        return (
            self._rebuilder is not None
            and self._rebuilder.recording
            and all(g["params"][0].grad is None for g in self.param_groups)  # nothing accumulated
        )

    def _backward_rebuilding(
        self, loss: torch.Tensor, run_backward: Callable[..., None], **kwargs: Any
    ) -> None:
        """Norm pass, then updates from rebuilt gradients (:mod:`optitrainer.clipping`); see :meth:`backward`."""
        params = [g["params"][0] for g in self.param_groups]
        rebuilt, _, fallback = self._rebuilder.plan(params)
        self._measuring, self._sq_norms, self._kept = True, {}, {}
        try:
            self._run_backward(
                run_backward, loss, **({**kwargs, "retain_graph": True} if fallback else kwargs)
            )
        finally:
            self._measuring = False
        kept, self._kept = self._kept, None
        try:
            self._set_clip_coef()
            used = [p for p in fallback if self._name_of[id(p)] in self._sq_norms]
            if (
                used
            ):  # the two-pass method for what nothing rebuilds; first: the graph saved the other weights
                self._run_backward(run_backward, loss, **{**kwargs, "inputs": used})
            rebuilt_ids = {id(p) for p in rebuilt}
            if self.averager is not None:
                self.averager.expect(
                    sum(
                        p.numel() * p.element_size()
                        for p in rebuilt
                        if self._name_of[id(p)] in self._sq_norms
                    )
                )
            for group in self.param_groups:
                name, p = group["param_name"], group["params"][0]
                if name not in self._sq_norms:
                    continue  # no gradient this step: no update, as without clipping
                if id(p) in rebuilt_ids:
                    grad = self._rebuilder.rebuild(p)
                    if self.averager is not None and grad is not None:
                        # averaged in buckets while the next weights are rebuilt
                        self.averager.add(grad, functools.partial(self._rebuilt_averaged, name, p))
                        continue
                    if self.average_gradient is not None and grad is not None:
                        self.average_gradient(grad)
                    check_rebuilt(name, grad, self._sq_norms[name])
                elif name in kept:
                    grad = kept.pop(name)
                else:
                    continue  # fallback: stepped by the second backward above
                p.grad = grad
                self._update(name, p)
            if self.averager is not None:
                self.averager.flush()
        finally:
            self._clip_coef = None
            self._rebuilder.finish()

    @torch.no_grad()
    def _rebuilt_averaged(self, name: str, param: nn.Parameter, average: torch.Tensor) -> None:
        check_rebuilt(name, average, self._sq_norms[name])
        param.grad = average
        self._update(name, param)

    def _set_clip_coef(self) -> None:
        # the same reduction as torch.nn.utils.clip_grad_norm_: norm of the per-tensor norms, in param order
        norms = [
            self._sq_norms[g["param_name"]] for g in self.param_groups if g["param_name"] in self._sq_norms
        ]
        total = _total_norm(norms)
        self._clip_coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        self.last_grad_norm = float(total)

    def run_training_step(self, run_forward_backward: Callable[[], torch.Tensor], sync: bool) -> torch.Tensor:
        """Run a whole forward/backward once, or twice when clipping (norm pass, then update pass).

        For callers that cannot reach the backward call itself (the trainer uses :meth:`backward`, which
        runs the forward once); also the path under FSDP, whose hooks expect one backward per forward.
        The second run restores the RNG state of the first, so both draw the same dropout masks.
        """
        self.begin_step(sync, record=False)
        if not self.clips:
            return run_forward_backward()
        if self.clipping == "hold":
            self._holding, self._sq_norms = True, {}
            try:
                loss = run_forward_backward()
            finally:
                self._holding = False
            self._update_held()
            return loss
        rng = _rng_state()
        self._measuring, self._sq_norms = True, {}
        try:
            run_forward_backward()
        finally:
            self._measuring = False
        self._set_clip_coef()
        _set_rng_state(rng)
        try:
            return run_forward_backward()
        finally:
            self._clip_coef = None

    # torch.optim.Optimizer surface ------------------------------------------------------------------
    def step(self, closure=None):  # the hooks already stepped
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # gradients are freed by the hooks
        return None

    def state_dict(self) -> dict[str, Any]:
        self._follow_params()
        return {
            "layerwise": {name: opt.state_dict() for name, opt in self.inner.items()},
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._follow_params()
        inner_states = state_dict["layerwise"]
        missing = sorted(set(self.inner) - set(inner_states))
        if missing:
            raise KeyError(
                f"layerwise optimizer checkpoint has no state for {len(missing)} parameter(s), e.g. {missing[:3]}; "
                "was it saved from the same model?"
            )
        for name, opt in self.inner.items():
            opt.load_state_dict(inner_states[name])
        saved = {g["param_name"]: g for g in state_dict["param_groups"]}
        for g in self.param_groups:
            g.update({k: v for k, v in saved[g["param_name"]].items() if k != "params"})


def _total_norm(norms: list[torch.Tensor]) -> torch.Tensor:
    """``clip_grad_norm_``'s reduction: the norm of the per-tensor norms, in parameter order.

    Under FSDP2 each norm is a DTensor over the shard's mesh; ``full_tensor()`` sums the shards' squares
    across ranks, as ``clip_grad_norm_`` does for sharded gradients.
    """
    if not norms:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def build_layerwise(
    spec: OptimizerSpec,
    ctx: BuildContext,
    max_grad_norm: float,
    average_gradient: Callable[[torch.Tensor], None] | None = None,
    averager: BucketedAverager | None = None,
    clipping: str = "rebuild",
) -> LayerwiseOptimizer:
    """One optimizer per trainable parameter, each built by the plugin's own factory.

    ``average_gradient`` averages a gradient across data-parallel ranks (DDP), see
    :func:`optitrainer.data_parallel.gradient_averager`; ``averager`` does it in buckets overlapped with
    backward (:class:`~optitrainer.data_parallel.BucketedAverager`) and takes precedence.
    """
    named = ctx.named_parameters()
    if not named:
        raise ValueError("the model has no trainable parameter to optimize")
    per_param = []
    for name, p in named:
        opt = spec.factory(replace(ctx, parameters=[(name, p)], layerwise=True))
        per_param.append((name, p, opt))
    return LayerwiseOptimizer(
        per_param,
        max_grad_norm=max_grad_norm,
        average_gradient=average_gradient,
        model=ctx.model,
        averager=averager,
        clipping=clipping,
    )


def _plain_backward(loss: torch.Tensor, **kwargs: Any) -> None:
    loss.backward(**kwargs)


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])
