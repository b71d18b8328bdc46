"""Time one fused backward+update of upstream lomo_optim vs optitrainer_lomo, by model depth.

Upstream's hook walks ``model.named_parameters()`` once per parameter (O(tensors²) Python work per
backward pass); optitrainer_lomo's hook handles only its own parameter. Not a test: run

    python plugins/optitrainer-lomo/bench_hooks.py [--layers 2 8 32] [--repeats 5] [--device cpu]

(upstream AdaLomo allocates with ``.cuda()``; on CPU this script makes ``Tensor.cuda`` a no-op).
"""

from __future__ import annotations

import argparse
import time

import torch
from lomo_optim import AdaLomo as UpstreamAdaLomo
from lomo_optim import Lomo as UpstreamLomo
from optitrainer_lomo.optim import AdaLomo, Lomo

from optitrainer.testing import SyntheticLMDataset, tiny_llama


def seconds_per_step(make_optimizer, layers: int, device: str, repeats: int) -> float:
    model = tiny_llama(num_hidden_layers=layers).to(device)
    opt = make_optimizer(model)
    ids = SyntheticLMDataset(n=4).input_ids.to(device)
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        loss = model(input_ids=ids, labels=ids).loss
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.fused_backward(loss, 1e-4)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.Tensor.cuda = lambda self, *a, **k: self  # upstream AdaLomo's allocations
    pairs = {
        "lomo": (lambda m: UpstreamLomo(m, lr=1e-4), lambda m: Lomo(list(m.parameters()), lr=1e-4)),
        "adalomo": (lambda m: UpstreamAdaLomo(m, lr=1e-4), lambda m: AdaLomo(list(m.parameters()), lr=1e-4)),
    }
    print(f"device={args.device}  backward+update, best of {args.repeats} (ms)")
    print(f"{'optimizer':<9} {'layers':>6} {'tensors':>7} {'upstream':>10} {'optitrainer':>12} {'ratio':>7}")
    for name, (upstream, ours) in pairs.items():
        for layers in args.layers:
            tensors = len(list(tiny_llama(num_hidden_layers=layers).parameters()))
            t_up = seconds_per_step(upstream, layers, args.device, args.repeats)
            t_ours = seconds_per_step(ours, layers, args.device, args.repeats)
            print(
                f"{name:<9} {layers:>6} {tensors:>7} {t_up * 1e3:>10.2f} {t_ours * 1e3:>12.2f} {t_up / t_ours:>6.1f}x"
            )


if __name__ == "__main__":
    main()
