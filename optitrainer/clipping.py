"""Exact gradient clipping for engines that update inside the backward pass, at one extra matmul per weight.

Clipping by the global norm needs every gradient before the first update; an engine that frees each
gradient right after its update (layerwise, LOMO) cannot keep them all. Running the backward twice
(a norm pass, then an update pass) costs a whole extra backward: forward 1 + backward 2 + backward 2
= 5 units against 3, ≈ 1.67 ×.

:class:`GradientRebuilder` makes the second pass cheaper. During the step's forward it records, for
every ``nn.Linear``, ``nn.Embedding`` and transformers ``Conv1D`` (GPT-2's projections) whose weight it
covers, the module's input (the tensor autograd saves anyway) and, during the norm pass, the gradient
of its output. After the norm pass each weight gradient is rebuilt from those two with the very op
autograd runs (``dY^T @ X``, or ``X^T @ dY`` for ``Conv1D``'s ``(in, out)`` weight, as
``mm_mat2_backward`` computes them; ``aten.embedding_backward`` for embeddings): the same bits, for one
weight-gradient matmul instead of a whole backward. Forward 1 + backward 2 + rebuild 1 = 4 units,
≈ 1.33 ×.

What is not rebuilt:

* one-dimensional parameters (norm weights, biases): their gradients are kept from the norm pass
  (their total size is the sum of the model's vectors, a small fraction of one weight matrix);
* anything else (other layer types, a weight with more than two contributions per step, a subclass
  with its own ``forward``): a second backward restricted to those parameters
  (``backward(inputs=...)``), i.e. the two-pass method for them only. Logged once.

A weight with two contributions, from tied modules (an embedding shared with the LM head) or from a
module called twice, is rebuilt as the sum of the two, as autograd sums them: two terms add up to the
same bits in either order. (Three would not: autograd's order would have to be replayed.) Without it a
tied embedding would need a second backward down to the embedding, i.e. a whole one.

Under autocast (bf16/fp16 mixed precision) a ``Linear`` multiplies in the autocast dtype: its input is
recorded cast as autocast casts it (one copy shared by the modules that read the same input), the
gradient is rebuilt in that dtype and cast to the weight's, as autograd's cast backward does.

Memory: the output gradients of the covered modules are kept from the norm pass until their weight
is rebuilt (the inputs are activations autograd keeps anyway): at most one activation-sized tensor
per covered module (the logits' gradient for the LM head), released module by module during the update.

Each rebuilt gradient is checked against the norm the norm pass measured on autograd's own gradient;
a mismatch (e.g. a weight also used outside its module) raises instead of training on a wrong gradient.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("optitrainer")

__all__ = ["GradientRebuilder", "RebuildMismatchError", "activation_checkpointing", "check_rebuilt"]


class RebuildMismatchError(RuntimeError):
    """A rebuilt gradient differs from the one autograd computed."""


#: the most contributions to one weight's gradient that are rebuilt (two add up in either order)
MAX_CONTRIBUTIONS = 2


@dataclass
class _Call:
    """One call of a covered module in this step's forward: what its weight's contribution is built from."""

    inputs: torch.Tensor
    cast: bool  # multiplied in the autocast dtype: the gradient is cast back to the weight's
    output_grad: torch.Tensor | None = None


@dataclass
class _Record:
    module: nn.Module
    kind: str  # "linear" | "conv1d" | "embedding"
    calls: list[_Call] = field(default_factory=list)
    unusual: bool = False  # a call the rebuild does not cover: the weight is left to autograd


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    conv1d = _transformers_conv1d()
    if conv1d is not None and isinstance(module, conv1d) and type(module).forward is conv1d.forward:
        return "conv1d"
    if (
        isinstance(module, nn.Embedding)
        and type(module).forward is nn.Embedding.forward
        and not module.sparse
        and module.max_norm is None  # max_norm renormalises the weight in the forward
    ):
        return "embedding"
    return None


class GradientRebuilder:
    """Rebuilds the weight gradients of a model's ``Linear``/``Conv1D``/``Embedding`` modules from one step's records.

    Use per step: :meth:`start` before the forward, :meth:`plan` after it (before the norm pass),
    :meth:`rebuild` for each planned weight after the norm pass, :meth:`finish` at the end.
    """

    def __init__(self, model: nn.Module, params: Iterable[nn.Parameter]):
        wanted = {id(p) for p in params}
        users: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                users[id(p)] = users.get(id(p), 0) + 1
        self._records: dict[int, list[_Record]] = {}  # id(weight) -> its modules' records (2 if tied)
        self._by_module: dict[int, _Record] = {}  # id(module) -> record (a wrapper may swap the weight)
        for module in model.modules():
            kind = _kind(module)
            w = getattr(module, "weight", None)
            if kind is None or w is None or id(w) not in wanted or users.get(id(w), 0) > MAX_CONTRIBUTIONS:
                continue
            rec = self._by_module[id(module)] = _Record(module, kind)
            self._records.setdefault(id(w), []).append(rec)
        for w, recs in list(self._records.items()):
            if len(recs) != users[w]:  # shared with a module the rebuild does not cover
                del self._records[w]
                for rec in recs:
                    del self._by_module[id(rec.module)]
        self._model = model
        self._recording = False
        #: id(input) -> (weakref to it, its autocast copy): q/k/v read one input, record one copy
        self._casts: dict[int, tuple[Any, torch.Tensor]] = {}
        self._hooks = [rec.module.register_forward_hook(self._on_forward) for rec in self._by_module.values()]
        self._logged = False

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.finish()

    @property
    def recording(self) -> bool:
        """Whether this step's forward is being recorded (between :meth:`start` and :meth:`plan`)."""
        return self._recording

    # -- recording --------------------------------------------------------------------------------
    def start(self) -> None:
        """Before the forward of a step that clips: record the covered modules' inputs and output grads.

        Not under activation checkpointing: held inputs would undo it (the two-pass method runs instead).
        """
        self.finish()
        self._recording = not activation_checkpointing(self._model)

    def finish(self) -> None:
        """Drop every record (and the tensors it holds)."""
        self._recording = False
        self._casts.clear()
        for rec in self._by_module.values():
            rec.calls, rec.unusual = [], False

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._recording or not torch.is_grad_enabled():
            return  # generation, reference models, evaluation: not part of this step's graph
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        rec = self._by_module[id(module)]
        if rec.unusual:
            return
        x = args[0] if args else None
        cast = output.dtype != module.weight.dtype
        contributions = sum(len(r.calls) for r in self._records.get(id(module.weight), ()))
        if (
            contributions >= MAX_CONTRIBUTIONS  # a third one: the sum's order would matter
            or not isinstance(x, torch.Tensor)
            or (cast and not (rec.kind != "embedding" and _autocast_dtype(output) == output.dtype))
            or "forward" in module.__dict__  # a forward patched on the instance (e.g. TRL's fp32 LM head)
        ):
            rec.unusual, rec.calls = True, []  # left to autograd
            return
        call = _Call(self._autocast_copy(x.detach(), output.dtype) if cast else x.detach(), cast)
        rec.calls.append(call)

        def keep(grad: torch.Tensor, call: _Call = call) -> None:
            call.output_grad = grad

        output.register_hook(keep)

    def _autocast_copy(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` as autocast hands it to the matmul (``x.to(dtype)``), one copy per input tensor."""
        if x.dtype == dtype:
            return x
        ref, copy = self._casts.get(id(x), (None, None))
        if ref is None or ref() is not x:
            copy = x.to(dtype)
            self._casts[id(x)] = (weakref.ref(x), copy)
        return copy

    # -- after the forward -------------------------------------------------------------------------
    def plan(
        self, params: Iterable[nn.Parameter]
    ) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """``(rebuilt, kept, fallback)``: how each parameter's gradient reaches the update pass.

        rebuilt: weights with one or two recorded contributions in this step's graph (a module called
        once or twice, or two tied modules); kept: one-dimensional parameters, their norm-pass gradient
        is kept; fallback: the rest, a second backward.
        """
        self._recording = False
        rebuilt, kept, fallback = [], [], []
        for p in params:
            if self._rebuildable(p):
                rebuilt.append(p)
            elif p.dim() <= 1:
                kept.append(p)
            else:
                fallback.append(p)
        if not self._logged:
            self._logged = True
            logger.info(
                "optitrainer: exact clipping rebuilds %d weight gradients from saved activations, keeps %d "
                "vector gradients from the norm pass, and runs a second backward for %d parameter(s)%s",
                len(rebuilt),
                len(kept),
                len(fallback),
                f" (e.g. shape {tuple(fallback[0].shape)})" if fallback else "",
            )
        return rebuilt, kept, fallback

    def _rebuildable(self, p: nn.Parameter) -> bool:
        recs = self._records.get(id(p), ())
        contributions = sum(len(rec.calls) for rec in recs)
        return (
            bool(recs)
            and not any(rec.unusual or rec.module.weight is not p for rec in recs)
            and 1 <= contributions <= MAX_CONTRIBUTIONS
        )

    @torch.no_grad()
    def rebuild(self, weight: nn.Parameter) -> torch.Tensor | None:
        """The weight's gradient of this step, as autograd computes it; ``None`` if it got none.

        Frees the modules' records.
        """
        grad = None
        for rec in self._records[id(weight)]:
            calls, rec.calls = rec.calls, []
            for call in calls:
                part = self._contribution(rec, call, weight.dtype)
                if part is None:
                    continue  # no gradient reached this call's output: it contributes nothing
                grad = part if grad is None else grad.add_(part)  # two terms: either order, same bits
        return grad

    @staticmethod
    def _contribution(rec: _Record, call: _Call, dtype: torch.dtype) -> torch.Tensor | None:
        x, dy = call.inputs, call.output_grad
        if dy is None:
            return None
        if rec.kind == "linear":
            # autograd's mm_mat2_backward for the transposed weight: grad.t().mm(mat1), already (out, in)
            grad = torch.mm(dy.reshape(-1, dy.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
            return grad.to(dtype) if call.cast else grad
        if rec.kind == "conv1d":
            # addmm's row-major (in, out) weight: mm_mat2_backward's mat1.t().mm(grad)
            grad = torch.mm(x.reshape(-1, x.shape[-1]).t(), dy.reshape(-1, dy.shape[-1]))
            return grad.to(dtype) if call.cast else grad
        m = rec.module
        return torch.ops.aten.embedding_backward(
            dy,
            x,
            m.num_embeddings,
            -1 if m.padding_idx is None else m.padding_idx,
            m.scale_grad_by_freq,
            False,
        )


@functools.cache
def _transformers_conv1d() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's projections: ``addmm(bias, x, weight)``, weight ``(in, out)``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _autocast_dtype(output: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on ``output``'s device, or ``None`` when autocast is off there."""
    device = output.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether the model recomputes its forward inside backward (recorded inputs would outlive it)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def check_rebuilt(name: str, grad: torch.Tensor | None, measured: torch.Tensor) -> None:
    """Raise unless ``grad``'s norm is the norm the norm pass measured on autograd's gradient."""
    norm = float("nan") if grad is None else float(torch.linalg.vector_norm(grad, 2.0))
    ref = float(measured)
    if not math.isclose(norm, ref, rel_tol=1e-4, abs_tol=1e-12):
        raise RebuildMismatchError(
            f"exact clipping: the gradient of {name} rebuilt from its module's input and output gradient has "
            f"norm {norm:.6g}, autograd's had {ref:.6g}; the weight is probably also used outside its module. "
            "Please report it; meanwhile set max_grad_norm=0 or use the non-layerwise optimizer"
        )
