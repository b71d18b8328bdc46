"""Upstream bugs the bridge fixes by subclassing; the update's numbers stay upstream's wherever upstream works.

Nothing heavy is imported at module level: ``__init__`` reads :data:`NOTES` for the docs while listing.
"""

from __future__ import annotations

from functools import cache

#: upstream key -> the bug and the fix (shown by ``optitrainer info`` and the README)
NOTES = {
    "soap": "merge_dims=True crashes upstream on every tensor whose dimensions all merge into one (any 1-D "
    "tensor, any with numel <= max_precondition_dim: pytorch_optimizer's merge_small_dims returns [1]); here "
    "such a tensor becomes one dimension of numel entries, as the SOAP reference (nikhilvyas/SOAP) merges it",
}


def fixed_class(key: str, cls: type) -> type:
    """``cls``, or its subclass with the bug of :data:`NOTES` fixed."""
    return _soap(cls) if key == "soap" else cls


@cache
def _soap(cls: type) -> type:
    from pytorch_optimizer.optimizer.utils.shape import merge_small_dims

    class SOAP(cls):
        __doc__ = cls.__doc__

        def merge_dims(self, grad, max_precondition_dim: int):
            # upstream's body, except that [1] (its answer for "all merged into one") keeps the entries
            if self.data_format == "channels_last" and grad.dim() == 4:
                grad = grad.permute(0, 3, 1, 2)
            shape = merge_small_dims(grad.size(), max_precondition_dim)
            return grad.reshape([grad.numel()] if shape == [1] else shape)

    return SOAP
