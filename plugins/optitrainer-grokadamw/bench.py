"""Time one GrokAdamW step: upstream ``grokadamw.GrokAdamW`` vs ``optitrainer_grokadamw.GrokAdamW``.

    python plugins/optitrainer-grokadamw/bench.py                 # CUDA if available, else CPU
    python plugins/optitrainer-grokadamw/bench.py --device cpu --params 8 --size 256 --steps 5

Upstream keeps its three state tensors on the CPU and copies them to the parameter's device and
back for every parameter at every step; on CUDA these copies dominate the step. On CPU they are
no-ops (``.to("cpu")`` of a CPU tensor returns it), so there the ratio stays near 1: the point of
the CPU run is that the numbers are identical. Both optimizers see the same gradients; the script
checks that they end with bit-identical parameters.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(device: str | None = None, params: int = 16, size: int = 1024, steps: int = 10) -> dict[str, float]:
    """Return the seconds per step of both optimizers and their ratio (upstream / ours)."""
    from grokadamw import GrokAdamW as Upstream
    from optitrainer_grokadamw import GrokAdamW

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device="cpu").manual_seed(0)
    init = [torch.randn(size, size, generator=gen) for _ in range(params)]
    grads = [[torch.randn(size, size, generator=gen).to(dev) for _ in range(params)] for _ in range(2)]

    results = {}
    finals = {}
    for label, cls in (("upstream", Upstream), ("optitrainer", GrokAdamW)):
        ps = [torch.nn.Parameter(t.to(dev)) for t in init]
        opt = cls(ps, lr=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # upstream's deprecated torch.cuda.amp.autocast()
            for step in range(steps + 1):  # step 0 creates the state: not timed
                if step == 1:
                    _sync(dev)
                    start = time.perf_counter()
                for p, g in zip(ps, grads[step % 2]):
                    p.grad = g.clone()
                opt.step()
            _sync(dev)
        results[label] = (time.perf_counter() - start) / steps
        finals[label] = [p.detach().cpu() for p in ps]
    same = all(torch.equal(a, b) for a, b in zip(finals["upstream"], finals["optitrainer"]))
    results["ratio"] = results["upstream"] / results["optitrainer"]
    results["identical"] = float(same)
    print(
        f"device={dev} params={params}x{size}x{size} steps={steps}: "
        f"upstream {results['upstream'] * 1e3:.2f} ms/step, optitrainer {results['optitrainer'] * 1e3:.2f} ms/step, "
        f"ratio {results['ratio']:.2f}x, identical parameters: {same}"
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--params", type=int, default=16, help="number of square parameters")
    parser.add_argument("--size", type=int, default=1024, help="side of each parameter")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    a = parser.parse_args()
    res = bench(a.device, a.params, a.size, a.steps)
    if not res["identical"]:
        raise SystemExit("the two optimizers disagree")


if __name__ == "__main__":
    main()
