"""How far an optimizer turns float rounding into weight movement: the yardstick for reordered sums.

Accumulated micro-batches, or ranks averaging half-batch gradients, compute the same gradient sums in
another order. Most optimizers land within ~1e-8 of the one-batch run; one that orthogonalises or
eigendecomposes its update (Muon, SOAP) and then normalises it can land much further, and correctly. To
tell that from a wrong update, :func:`rounding_sensitivity` reruns the reference from weights one
rounding step away and reports how far it lands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: a comparison that misses its fixed tolerance may still differ by this many times the sensitivity
NOISE_FACTOR = 3.0


def rounding_sensitivity(optim: str, out_dir: Path, reference, **train_args: Any) -> tuple[float, float]:
    """(weights, losses): how far ``reference`` lands from the same run started one rounding step away.

    ``reference`` is the :func:`~optitrainer.testing.run_training` result of the same arguments
    (``train_args``, passed on). Every initial weight is multiplied by ``1 ± eps`` (random signs, fixed
    seed), so every gradient differs from the reference's by about what a different summation order
    makes, whatever engine computes it (a gradient hook would miss gradients the layerwise engine
    rebuilds for exact clipping).
    """
    import torch

    from ..testing import max_param_diff, run_training, tiny_llama

    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            signs = torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1
            p.mul_(1 + torch.finfo(p.dtype).eps * signs)
    run = run_training(optim, out_dir, model=model, **train_args)
    dloss = max(abs(a - b) for a, b in zip(reference.losses, run.losses))
    return max_param_diff(reference.params, run.params), dloss
