"""Memory accounting: live tensor bytes by role at the moment they peak, and the analytic floor.

:class:`LiveTensorTracker` counts every tensor storage alive on one device, exactly:

* a ``TorchDispatchMode`` sees the output of every aten operation (forward, backward, optimizer
  step, data collation) and registers each new storage with its ``nbytes()``;
* a weak reference on the storage object removes it when the storage is freed (PyTorch keeps one
  Python object per storage for as long as the storage lives, also when only autograd holds it);
* tensors that existed before tracking started (the model's weights and buffers) are registered
  explicitly.

When the running total reaches a new maximum, the tracker copies the list of live storages at the
next free (so the copy is exactly the state at the peak). Roles are tagged on storages, not on
bytes, at the next operation after each copy and at the end: the weights, the ``.grad`` of every
parameter (also gradients still in flight to a parameter, tagged by a tensor hook before they are
accumulated, see :class:`GradientWatch`), and every tensor reachable from the optimizer's state
(also per-parameter inner optimizers and wrappers). A storage keeps its highest role (weights >
gradients > optimizer state); everything else is ``other``: activations saved for backward,
temporaries, batches, buffers, listed by the aten operation that allocated them. The breakdown is
computed at the end, so a gradient that was still in flight at the peak counts as a gradient.

Memory that no aten operation returns (a kernel's private scratch space, the allocator's own
overhead, Python objects) is not counted; the peak RSS is reported next to it as a cross-check.
"""

from __future__ import annotations

import os
import resource
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: the roles of the breakdown, in the order of their priority (a storage keeps its first role)
ROLES = ("params", "grads", "optimizer_state", "other")
_PRIORITY = {role: i for i, role in enumerate(ROLES)}

RolesFn = Callable[[], dict[str, Iterable[torch.Tensor]]]


class _OutputsMode(TorchDispatchMode):
    """Hands every tensor an aten operation returns to ``on_output``."""

    def __init__(self, on_output: Callable[[torch.Tensor, Any], None], before: Callable[[], None]):
        super().__init__()
        self._on_output, self._before = on_output, before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._before()
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self._on_output(out, func)
        elif isinstance(out, (tuple, list)):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self._on_output(t, func)
                elif isinstance(t, (tuple, list)):  # e.g. aten ops returning lists of lists
                    for u in t:
                        if isinstance(u, torch.Tensor):
                            self._on_output(u, func)
        return out


class LiveTensorTracker:
    """Exact count of live tensor-storage bytes on one device type, with a breakdown at the peak.

    ``roles`` is called after every snapshot of a new peak (at the next operation) and at
    :meth:`stop`; it returns the tensors that currently hold each role (``params``, ``grads``,
    ``optimizer_state``). Use as a context manager::

        tracker = LiveTensorTracker("cpu", roles=training_roles(model, lambda: trainer.optimizer))
        with tracker:
            trainer.train()
        tracker.breakdown()  # {"params": ..., "grads": ..., "optimizer_state": ..., "other": ..., "total": ...}
    """

    def __init__(self, device: str | torch.device = "cpu", roles: RolesFn | None = None):
        self.device_type = torch.device(device).type
        self._roles_fn = roles
        # id(storage) -> [uid, nbytes, weakref]; uids are never reused, so tags outlive the storage
        self._live: dict[int, list[Any]] = {}
        self._role_of: dict[int, str] = {}
        self._origin: dict[int, Any] = {}  # uid -> the aten op that created the storage
        self._next_uid = 0
        self._pending = False
        self._tags_pending = False
        self._peak_live: dict[int, int] = {}
        self._mode: _OutputsMode | None = None
        #: bytes alive now / at the highest point since :meth:`start`
        self.current = 0
        self.peak = 0
        #: bytes of role tensors that no operation created while tracking (should stay 0)
        self.untracked_role_bytes = 0
        self._untracked_seen: set[int] = set()

    # lifecycle ------------------------------------------------------------------------------
    def start(self, existing: Iterable[torch.Tensor] = ()) -> LiveTensorTracker:
        """Register tensors that already exist (weights, buffers), then watch every operation."""
        for t in existing:
            self._track(t)
        self._mode = _OutputsMode(self._track, self._flush_tags)
        self._mode.__enter__()
        return self

    def stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if self._pending:
            self._snapshot()
        self._tags_pending = False
        self._tag_roles()  # state that lives on (it existed at the peak if its storage did)

    def __enter__(self) -> LiveTensorTracker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # accounting -----------------------------------------------------------------------------
    def _storage(self, t: torch.Tensor):
        if t.device.type != self.device_type or t.is_sparse or t.is_nested:
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage
            return None

    def _track(self, t: torch.Tensor, origin: Any = "existing") -> int | None:
        st = self._storage(t)
        if st is None:
            return None
        key = id(st)
        entry = self._live.get(key)
        nbytes = st.nbytes()
        if entry is None:
            uid = self._next_uid
            self._next_uid += 1
            self._origin[uid] = origin
            ref = weakref.ref(st, lambda _ref, key=key: self._on_free(key))
            self._live[key] = [uid, nbytes, ref]
            self._grow(nbytes)
            return uid
        if nbytes != entry[1]:  # resized in place (resize_, out= variants)
            delta = nbytes - entry[1]
            if delta < 0 and self._pending:
                self._snapshot()
            entry[1] = nbytes
            self._grow(delta) if delta > 0 else self._shrink(-delta)
        return entry[0]

    def _grow(self, nbytes: int) -> None:
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self._pending = True  # snapshot lazily, at the next free: exactly the peak's contents

    def _shrink(self, nbytes: int) -> None:
        self.current -= nbytes

    def _on_free(self, key: int) -> None:
        if self._pending:
            self._snapshot()
        entry = self._live.pop(key, None)
        if entry is not None:
            self._shrink(entry[1])

    def _snapshot(self) -> None:
        # called while a storage is being deallocated: copy numbers only, touch no tensor here
        # (asking a tensor for its storage during a deallocation can crash); roles are tagged at
        # the next operation, when every role tensor of the peak that is still alive can be asked
        self._pending = False
        self._peak_live = {uid: n for uid, n, _ in self._live.values()}
        self._tags_pending = True

    def _flush_tags(self) -> None:
        if self._tags_pending:
            self._tags_pending = False
            self._tag_roles()

    # roles ----------------------------------------------------------------------------------
    def tag(self, tensors: Iterable[torch.Tensor] | torch.Tensor, role: str) -> None:
        """Mark the storages of ``tensors`` with ``role`` (kept if a higher-priority role came first)."""
        if isinstance(tensors, torch.Tensor):
            tensors = (tensors,)
        rank = _PRIORITY[role]
        for t in tensors:
            st = self._storage(t)
            if st is None:
                continue
            entry = self._live.get(id(st))
            if entry is None:
                if id(st) not in self._untracked_seen:
                    self._untracked_seen.add(id(st))
                    self.untracked_role_bytes += st.nbytes()
                continue
            old = self._role_of.get(entry[0])
            if old is None or _PRIORITY[old] > rank:
                self._role_of[entry[0]] = role

    def _tag_roles(self) -> None:
        if self._roles_fn is None:
            return
        for role, tensors in self._roles_fn().items():
            self.tag(tensors, role)

    def other_by_origin(self, top: int = 8) -> dict[str, int]:
        """Bytes of ``other`` at the peak by the aten operation that allocated them, largest first."""
        sums: dict[str, int] = {}
        for uid, nbytes in self._peak_live.items():
            if uid not in self._role_of:
                name = str(self._origin.get(uid, "?"))
                sums[name] = sums.get(name, 0) + nbytes
        return dict(sorted(sums.items(), key=lambda kv: -kv[1])[:top])

    def breakdown(self) -> dict[str, int]:
        """Bytes per role at the peak (``total`` equals :attr:`peak`)."""
        out = dict.fromkeys(ROLES, 0)
        for uid, nbytes in self._peak_live.items():
            out[self._role_of.get(uid, "other")] += nbytes
        out["total"] = sum(out[r] for r in ROLES)
        return out


# --- what holds which role in a training run -------------------------------------------------------


def iter_optimizers(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    """``optimizer`` and every optimizer it wraps or owns (accelerate's wrapper, per-parameter inner ones)."""
    seen: set[int] = set()
    todo = [optimizer]
    while todo:
        opt = todo.pop()
        if opt is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer):
            yield opt
        for value in vars(opt).values() if hasattr(opt, "__dict__") else ():
            if isinstance(value, torch.optim.Optimizer):
                todo.append(value)
            elif isinstance(value, dict):
                todo.extend(v for v in value.values() if isinstance(v, torch.optim.Optimizer))
            elif isinstance(value, (list, tuple)):
                todo.extend(v for v in value if isinstance(v, torch.optim.Optimizer))


def optimizer_state_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Every tensor reachable from the state of ``optimizer`` and of the optimizers it holds.

    Walks dicts, lists and plain objects (e.g. GaLore's projectors) inside ``optimizer.state``;
    never walks into modules or parameters' keys.
    """
    out: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if depth > 6 or id(obj) in seen:
            return
        if isinstance(obj, torch.Tensor):
            out.append(obj)
            return
        if obj is None or isinstance(obj, (int, float, str, bool, torch.nn.Module, torch.optim.Optimizer)):
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for v in vars(obj).values():
                walk(v, depth + 1)

    for opt in iter_optimizers(optimizer):
        state = getattr(opt, "state", None)
        if isinstance(state, dict):
            for per_param in state.values():
                walk(per_param, 0)
    return out


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the distinct storages in the optimizer's state (see :func:`optimizer_state_tensors`)."""
    return unique_storage_bytes(optimizer_state_tensors(optimizer))


def training_roles(model: torch.nn.Module, get_optimizer: Callable[[], Any]) -> RolesFn:
    """The roles of a training run: the model's weights, their ``.grad``, the optimizer's state."""
    params = list(model.parameters())

    def roles() -> dict[str, Iterable[torch.Tensor]]:
        return {
            "params": params,
            "grads": [p.grad for p in params if p.grad is not None],
            "optimizer_state": optimizer_state_tensors(get_optimizer()),
        }

    return roles


class GradientWatch:
    """Sees each gradient as it reaches its parameter (a tensor hook, before accumulation).

    It tags the gradient's storage for the tracker, also when a layerwise or fused-backward hook
    frees it right after, and records :attr:`peak_bytes`: the most gradient bytes alive at once
    (every ``.grad`` plus the one arriving), at any moment, not only at the peak of the total.
    """

    def __init__(self, tracker: LiveTensorTracker, model: torch.nn.Module):
        self.tracker = tracker
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.peak_bytes = 0
        self._handles = [p.register_hook(self._on_gradient) for p in self.params]

    def _on_gradient(self, grad: torch.Tensor) -> None:
        self.tracker.tag(grad, "grads")
        alive = [p.grad for p in self.params if p.grad is not None]
        self.peak_bytes = max(self.peak_bytes, unique_storage_bytes([*alive, grad]))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# --- sizes and the floor ---------------------------------------------------------------------------


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights count once)."""
    seen: dict[int, int] = {}
    keep = []
    for t in tensors:
        if t.is_sparse or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        keep.append(st)  # keep the storage objects alive so their ids stay unique
        seen[id(st)] = st.nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class ModelSizes:
    """Parameter bytes of a model, counted by storage (tied weights once)."""

    n_params: int
    param_bytes: int
    trainable_bytes: int
    largest_param: str
    largest_param_bytes: int


def model_sizes(model: torch.nn.Module) -> ModelSizes:
    params = list(model.named_parameters())  # tied weights appear once
    trainable = [(n, p) for n, p in params if p.requires_grad]
    largest = max(trainable, key=lambda np_: np_[1].numel() * np_[1].element_size(), default=("", None))
    return ModelSizes(
        n_params=sum(p.numel() for _, p in params),
        param_bytes=unique_storage_bytes(p for _, p in params),
        trainable_bytes=unique_storage_bytes(p for _, p in trainable),
        largest_param=largest[0],
        largest_param_bytes=0 if largest[1] is None else largest[1].numel() * largest[1].element_size(),
    )


#: how many gradients a method needs alive at once
GRADS_ALL = "all"  # standard optimizers: every gradient, until the step
GRADS_LARGEST = "largest"  # layerwise / fused backward: one parameter's at a time


def analytic_floor(sizes: ModelSizes, state_bytes: int, grad_rule: str) -> dict[str, int]:
    """Weights + optimizer state + the gradients the method needs alive at once.

    Activations are not part of the floor (they depend on batch and sequence length, not on the
    optimizer); they show up as ``other`` in the measured breakdown.
    """
    grads = sizes.trainable_bytes if grad_rule == GRADS_ALL else sizes.largest_param_bytes
    return {
        "params": sizes.param_bytes,
        "grads": grads,
        "optimizer_state": state_bytes,
        "total": sizes.param_bytes + grads + state_bytes,
    }


# --- process-level cross-checks --------------------------------------------------------------------


def rss_peak_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_now_bytes() -> int | None:
    """Resident set size now (psutil if installed, else ``/proc/self/statm``)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
