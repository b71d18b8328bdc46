"""What exact clipping costs: a clipped and an unclipped trainer, stepping in turn in one process.

    python -m optitrainer.bench.clipcost --model tiny --optim adamw_torch_layerwise,lomo --max-grad-norm 1

Two ``OptiTrainer`` runs of the same optimizer, model and batches, one with ``--max-grad-norm`` and one
with 0, train in two threads that take turns step by step (a callback hands the turn over at every
``on_step_end``), so load from other processes hits both alike; timing separate runs on a shared
machine mixes the cost of clipping with the load of the moment. A step is ``on_step_begin`` to
``on_step_end``: forward, backward, clipping, optimizer step and scheduler (not the batch fetch).
Prints, per optimizer, both medians and their ratio; ``--method two-pass`` measures the method without
rebuilt gradients (two backward passes for every parameter) for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

#: seconds a trainer waits for its turn before giving up (the other run failed or hung)
TURN_TIMEOUT_S = 600.0


class _TakeTurns(TrainerCallback):
    """Runs this trainer's steps only on its turn; records each step's duration."""

    def __init__(self, mine: threading.Semaphore, theirs: threading.Semaphore):
        self.mine, self.theirs = mine, theirs
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.mine.acquire(timeout=TURN_TIMEOUT_S):
            raise TimeoutError("the other run did not hand the turn back")
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)
        self.theirs.release()


def _trainer(ns: argparse.Namespace, optim: str, clip: float, turns: _TakeTurns, workdir: str):
    from transformers.trainer_callback import PrinterCallback

    from .. import OptiTrainer, OptiTrainingArguments
    from ..registry import REGISTRY
    from ..testing import SyntheticLMDataset
    from . import models

    resolved = REGISTRY.resolve(optim)
    model = models.build_model(ns.model, seed=ns.seed)
    args = OptiTrainingArguments(
        output_dir=workdir,
        max_steps=ns.steps,
        per_device_train_batch_size=ns.batch_size,
        learning_rate=ns.lr,
        max_grad_norm=clip,
        optim=optim,
        optim_target_modules=ns.target_modules if resolved.spec.capabilities.needs_target_modules else None,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=ns.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    data = SyntheticLMDataset(
        n=ns.steps * ns.batch_size, seq_len=ns.seq_len, vocab_size=models.vocab_size(model), seed=ns.seed
    )
    trainer = OptiTrainer(model=model, args=args, train_dataset=data, callbacks=[turns])
    trainer.remove_callback(PrinterCallback)
    if ns.method == "two-pass":
        _two_pass(trainer)
    return trainer


def _two_pass(trainer) -> None:
    """Build the optimizer now, without the model: clipping then runs two backward passes for everything."""
    opt = trainer.create_optimizer()
    while hasattr(opt, "optimizer") and not hasattr(opt, "_rebuilder"):
        opt = opt.optimizer
    if hasattr(opt, "model"):  # the layerwise engine: without a model it never rebuilds
        opt.model = None
    rebuilder = getattr(opt, "_rebuilder", None)
    if rebuilder is not None:  # a fused-backward optimizer built with the model
        rebuilder.close()
        opt._rebuilder = None


def measure(ns: argparse.Namespace, optim: str) -> dict[str, Any]:
    """Median step seconds of the clipped and the unclipped run, stepping in turn."""
    import torch

    torch.set_num_threads(ns.threads)
    first, second = threading.Semaphore(1), threading.Semaphore(0)
    clipped_turns, plain_turns = _TakeTurns(first, second), _TakeTurns(second, first)
    errors: list[BaseException] = []
    with tempfile.TemporaryDirectory() as tmp:
        trainers = [
            _trainer(ns, optim, ns.max_grad_norm, clipped_turns, f"{tmp}/clip"),
            _trainer(ns, optim, 0.0, plain_turns, f"{tmp}/plain"),
        ]

        def train(trainer) -> None:
            try:
                trainer.train()
            except BaseException as exc:  # reported after both threads ended
                errors.append(exc)
                first.release()
                second.release()

        threads = [threading.Thread(target=train, args=(t,)) for t in trainers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    clipped, plain = clipped_turns.times[ns.warmup_steps :], plain_turns.times[ns.warmup_steps :]
    norms = [h.get("grad_norm") for h in trainers[0].state.log_history if "loss" in h]
    return {
        "optim": optim,
        "clipped_s": statistics.median(clipped),
        "unclipped_s": statistics.median(plain),
        "ratio": statistics.median(clipped) / statistics.median(plain),
        "pairwise_ratio": statistics.median(c / p for c, p in zip(clipped, plain)),
        "clipping_engaged": any(n is not None and n > ns.max_grad_norm for n in norms),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m optitrainer.bench.clipcost", description=__doc__.split("\n")[0]
    )
    p.add_argument("--optim", required=True, help="comma-separated optimizer names")
    p.add_argument("--model", default="tiny", help="tiny | 100m | a config.json (see optitrainer bench)")
    p.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="clipping of the clipped run (default: 1)"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the medians")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-modules", default="all-linear", help="for optimizers that need target modules")
    p.add_argument(
        "--method",
        choices=("rebuild", "two-pass"),
        default="rebuild",
        help="rebuild: as shipped; two-pass: a second backward for every parameter (the older method)",
    )
    ns = p.parse_args(argv)
    if ns.max_grad_norm <= 0:
        p.error("--max-grad-norm must be > 0 (the unclipped run uses 0)")
    print(f"{'optimizer':28} {'clipped ms':>11} {'unclipped ms':>13} {'ratio':>6} {'pairwise':>9}  engaged")
    for optim in (n.strip() for n in ns.optim.split(",") if n.strip()):
        r = measure(ns, optim)
        print(
            f"{r['optim']:28} {r['clipped_s'] * 1e3:11.1f} {r['unclipped_s'] * 1e3:13.1f} "
            f"{r['ratio']:6.3f} {r['pairwise_ratio']:9.3f}  {r['clipping_engaged']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
