"""``optitrainer bench --ddp N``: what each optimizer costs under DDP, contenders taking turns in each rank.

Two launches (``torchrun`` with N ranks, then one plain process), each training every
contender at once in its own thread: the threads take turns step by step (:class:`Turnstile`), in the
same order on every rank, so their collectives match and the load of the moment hits every contender
alike. A step is ``on_step_begin`` to ``on_step_end`` (forward, backward, averaging, clipping, optimizer
step). Then, in the same launch, communication alone on the model's gradient shapes: one blocking
all-reduce per gradient (what a hook that averages its own gradient pays), one flat all-reduce, and the
bucketed, overlapped averaging of :class:`~optitrainer.data_parallel.BucketedAverager`.

On CPU the ranks talk over gloo; with ``--device cuda`` (or ``auto`` on a machine with at least N GPUs)
each rank trains on its own GPU and the ranks talk over NCCL, and a step's time is taken after
``torch.cuda.synchronize()``.

Printed: each contender's median step time and its ratio to the first contender (``adamw_torch``:
DDP-wrapped under DDP, plain on one process); what the N ranks add to each contender's step; the
clipped / unclipped ratio of the layerwise engine, for both clipping schemes (``layerwise_clipping``:
``rebuild``, ``hold``); and for the contenders that average in their hooks, the bucket memory held, the
all-reduces sent and the time waited for averages per step.

    optitrainer bench --ddp 2 --model 8x512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

#: label, optim, max_grad_norm, layerwise_clipping: the first is the baseline every ratio divides by
DEFAULT_CONTENDERS = (
    ("adamw_torch", "adamw_torch", 0.0, "auto"),
    ("adamw_torch_layerwise", "adamw_torch_layerwise", 0.0, "auto"),
    ("lomo", "lomo", 0.0, "auto"),
    ("adamw_torch_layerwise clip1", "adamw_torch_layerwise", 1.0, "rebuild"),
    ("adamw_torch_layerwise clip1 hold", "adamw_torch_layerwise", 1.0, "hold"),
)
#: seconds a contender waits for its turn before the launch is declared hung
TURN_TIMEOUT_S = 600.0


class Turnstile:
    """Round-robin turns among threads; a finished thread leaves the circle."""

    def __init__(self, n: int) -> None:
        self._cond = threading.Condition()
        self._turn: int | None = None
        self._done = [False] * n
        self.failed: BaseException | None = None

    def start(self, first: int = 0) -> None:
        with self._cond:
            self._turn = first
            self._cond.notify_all()

    def wait(self, i: int) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._turn == i or self.failed is not None, TURN_TIMEOUT_S):
                raise TimeoutError(f"contender {i} waited {TURN_TIMEOUT_S:.0f} s for its turn")
            if self.failed is not None:
                raise RuntimeError("another contender failed") from self.failed

    def pass_on(self, i: int) -> None:
        with self._cond:
            n = len(self._done)
            following = [(i + k) % n for k in range(1, n + 1)]
            self._turn = next((j for j in following if not self._done[j]), None)
            self._cond.notify_all()

    def finish(self, i: int) -> None:
        with self._cond:
            self._done[i] = True
        self.pass_on(i)

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self.failed = exc
            self._cond.notify_all()


def resolve_device(requested: str, nproc: int, cuda_devices: int) -> str:
    """``cpu`` or ``cuda`` for ``--device`` (``auto``, ``cpu``, ``cuda``) with ``nproc`` ranks, one GPU each."""
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        return "cuda" if cuda_devices >= nproc else "cpu"
    if requested != "cuda":
        raise ValueError(
            f"--device {requested} with --ddp: each rank takes its own GPU; pass cuda, cpu or auto"
        )
    if cuda_devices < nproc:
        raise ValueError(
            f"--device cuda with --ddp {nproc}: this machine has {cuda_devices} CUDA device(s), one per rank "
            f"is needed (NCCL refuses two ranks on one GPU); run on a machine with {nproc} GPUs, or pass "
            "--device cpu (gloo)"
        )
    return "cuda"


def _synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so a step's time is its own (no-op on CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _turn_callback(turnstile: Turnstile, index: int, ready: threading.Event, device: str):
    from transformers import TrainerCallback

    class TakeTurns(TrainerCallback):
        """Holds the turn from its step's start through the logging after it; passes it at the next step."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._holding = False
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if self._holding:
                turnstile.pass_on(index)
            else:
                ready.set()  # set up (its collectives done): the next contender may set up
            turnstile.wait(index)
            self._holding = True
            _synchronize(device)
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize(device)
            self.times.append(time.perf_counter() - self._t0)

        def on_train_end(self, args, state, control, **kwargs):
            # the end of training gathers across ranks too: done while still holding the turn
            self._holding = False
            turnstile.finish(index)

    return TakeTurns()


def _averaging_stats(trainer: Any, steps: int) -> dict[str, float] | None:
    """What the trainer's bucketed averaging held and waited for (``None`` where DDP's reducer averages)."""
    averager = trainer.__dict__.get("_bucketed_averager")  # the cached property, once training built it
    if averager is None:
        return None
    return {
        "buffer_mib": averager.buffer_bytes / 2**20,
        "collectives_per_step": averager.collectives / steps,
        "wait_ms_per_step": averager.wait_s * 1e3 / steps,
    }


def _train_all(
    cfg: dict[str, Any], workdir: str
) -> tuple[list[list[float]], list[dict[str, float] | None], list[str]]:
    import torch
    from transformers.trainer_callback import PrinterCallback

    from .. import OptiTrainer, OptiTrainingArguments
    from ..registry import REGISTRY
    from ..testing import SyntheticLMDataset
    from . import models

    contenders = cfg["contenders"]
    device = cfg["device"]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    turnstile = Turnstile(len(contenders))
    callbacks, threads, trainers = [], [], []
    for i, (label, optim, clip, clipping) in enumerate(contenders):
        resolved = REGISTRY.resolve(optim)
        model = models.build_model(cfg["model"], seed=cfg["seed"])
        args = OptiTrainingArguments(
            output_dir=f"{workdir}/{i}",
            max_steps=cfg["steps"],
            per_device_train_batch_size=cfg["batch_size"],
            learning_rate=1e-3,
            max_grad_norm=clip,
            layerwise_clipping=clipping,
            optim=optim,
            optim_target_modules="all-linear" if resolved.spec.capabilities.needs_target_modules else None,
            logging_steps=10**6,
            save_strategy="no",
            report_to="none",
            seed=cfg["seed"],
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=device == "cpu",
            ddp_backend=("gloo" if device == "cpu" else "nccl") if world_size > 1 else None,
            ddp_bucket_cap_mb=cfg["bucket_cap_mb"],
        )
        n = cfg["steps"] * cfg["batch_size"] * world_size
        data = SyntheticLMDataset(n=n, seq_len=cfg["seq_len"], vocab_size=models.vocab_size(model), seed=1)
        ready = threading.Event()
        callback = _turn_callback(turnstile, i, ready, device)
        trainer = OptiTrainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        trainer.remove_callback(PrinterCallback)

        def train(trainer=trainer, ready=ready, label=label) -> None:
            try:
                if device == "cuda":  # the current CUDA device is per thread: this rank's, not GPU 0
                    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                trainer.train()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failure = RuntimeError(f"contender {label!r} failed: {type(exc).__name__}: {exc}")
                failure.__cause__ = exc
                turnstile.fail(failure)
                ready.set()

        thread = threading.Thread(target=train, name=label)
        thread.start()
        # one contender sets up at a time: its collectives (broadcasts, DDP's wrapping) in the same order
        # on every rank
        ready.wait()
        if turnstile.failed is not None:
            break
        callbacks.append(callback)
        threads.append(thread)
        trainers.append(trainer)
    if turnstile.failed is None:
        turnstile.start()
    for thread in threads:
        thread.join()
    if turnstile.failed is not None:
        raise turnstile.failed
    return (
        [c.times for c in callbacks],
        [_averaging_stats(t, cfg["steps"]) for t in trainers],
        [type(t.model_wrapped).__name__ for t in trainers],  # DDP's wrapper, or the model itself
    )


def _communication(
    model_spec: str, seed: int, bucket_cap_mb: float, device: str, repeats: int = 5
) -> dict[str, float]:
    """Median seconds to average the model's gradients: per tensor (blocking), flat, bucketed."""
    import torch
    import torch.distributed as dist

    from ..data_parallel import BucketedAverager
    from . import models

    model = models.build_model(model_spec, seed=seed)
    shapes = [p.shape for p in model.parameters()]
    del model
    world = dist.get_world_size()
    grads = [torch.randn(s, device=device) for s in shapes]

    def per_tensor() -> None:
        for g in grads:
            g.div_(world)
            dist.all_reduce(g)

    def flat() -> None:
        buf = torch.cat([g.reshape(-1) for g in grads])
        buf.div_(world)
        dist.all_reduce(buf)

    def bucketed() -> None:
        averager = BucketedAverager(world, bucket_cap_mb)
        for g in grads:
            averager.add(g, lambda avg: None)
        averager.flush()

    out = {}
    for name, fn in (("per_tensor", per_tensor), ("flat", flat), ("bucketed", bucketed)):
        times = []
        for _ in range(repeats):
            _synchronize(device)
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            _synchronize(device)
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def worker(config_path: str) -> None:
    """One rank of a ``torchrun`` launch: every contender, then (several ranks) communication alone."""
    import torch

    cfg = json.loads(Path(config_path).read_text())
    torch.set_num_threads(cfg["threads"])
    if cfg["device"] == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from .. import release_gloo_workers_at_exit

    release_gloo_workers_at_exit()
    with tempfile.TemporaryDirectory() as workdir:
        times, averaging, wrapped = _train_all(cfg, workdir)
    result: dict[str, Any] = {"step_times_s": times, "averaging": averaging, "wrapped": wrapped}
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        result["communication_s"] = _communication(
            cfg["model"], cfg["seed"], cfg["bucket_cap_mb"], cfg["device"]
        )
        result["world_size"] = dist.get_world_size()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(cfg["result"]).write_text(json.dumps(result))


def _launch(cfg: dict[str, Any], nproc: int, workdir: Path, timeout: float) -> dict[str, Any]:
    from ..torchrun import run_bounded, run_torchrun

    cfg = dict(cfg, result=str(workdir / f"result-{nproc}.json"))
    config_path = workdir / f"config-{nproc}.json"
    config_path.write_text(json.dumps(cfg))
    env = {"OMP_NUM_THREADS": str(cfg["threads"])}
    worker_args = ["-m", __name__, "--worker", config_path]
    if nproc > 1:
        code, out = run_torchrun(worker_args, nproc, timeout, env=env)
    else:
        # a plain process, not torchrun's: under torchrun accelerate wraps adamw_torch's model in DDP even
        # with one rank (transformers' find_unused_parameters=True, a bucket copy and a 1-rank all-reduce
        # per step: 30 ms more a step here), which is not what a one-process run pays
        code, out = run_bounded([sys.executable, *worker_args], timeout, env=env)
    if code is None:
        raise RuntimeError(f"the {nproc}-process launch timed out after {timeout:.0f} s:\n{out[-3000:]}")
    if code != 0:
        raise RuntimeError(f"the {nproc}-process launch failed ({code}):\n{out[-3000:]}")
    return json.loads(Path(cfg["result"]).read_text())


def _parse_contenders(text: str | None) -> list[tuple[str, str, float, str]]:
    """``name[:clip[:scheme]],...``: e.g. ``adamw_torch,adamw_torch_layerwise:1,adamw_torch_layerwise:1:hold``
    (``scheme``: ``layerwise_clipping``, ``auto`` by default)."""
    if not text:
        return list(DEFAULT_CONTENDERS)
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, rest = item.partition(":")
        clip, _, scheme = rest.partition(":")
        value = float(clip) if clip else 0.0
        label = f"{name} clip{value:g}" if value else name
        out.append((f"{label} {scheme}" if scheme else label, name, value, scheme or "auto"))
    return out


def measure(ns: argparse.Namespace) -> dict[str, Any]:
    """Both launches (``ns.ddp`` ranks, then one process); medians and ratios."""
    import torch

    from ..arguments import LAYERWISE_CLIPPING
    from ..registry import REGISTRY

    device = resolve_device(ns.device, ns.ddp, torch.cuda.device_count())  # 0 without CUDA
    contenders = _parse_contenders(ns.optim)
    for _, optim, _, scheme in contenders:
        REGISTRY.resolve(optim)  # a typo fails before anything launches
        if scheme not in LAYERWISE_CLIPPING:
            raise ValueError(f"clipping scheme {scheme!r}: use one of {', '.join(LAYERWISE_CLIPPING)}")
    cfg = {
        "contenders": contenders,
        "model": ns.model,
        "seed": ns.seed,
        "steps": ns.steps,
        "batch_size": ns.batch_size,
        "seq_len": ns.seq_len,
        "threads": ns.threads or 1,
        "bucket_cap_mb": ns.bucket_cap_mb,
        "device": device,
    }
    with tempfile.TemporaryDirectory() as tmp:
        launches = {n: _launch(cfg, n, Path(tmp), ns.timeout or 1800) for n in (ns.ddp, 1)}
    rows = []
    for i, (label, optim, clip, scheme) in enumerate(contenders):
        row = {"label": label, "optim": optim, "max_grad_norm": clip, "layerwise_clipping": scheme}
        for n, result in launches.items():
            times = result["step_times_s"][i][ns.warmup_steps :]
            base = result["step_times_s"][0][ns.warmup_steps :]
            row[f"ms_{n}"] = statistics.median(times) * 1e3
            row[f"ratio_{n}"] = statistics.median(times) / statistics.median(base)
            row[f"wrapped_{n}"] = result["wrapped"][i]
        row["averaging"] = launches[ns.ddp]["averaging"][i]
        rows.append(row)
    return {
        "rows": rows,
        "communication_s": launches[ns.ddp].get("communication_s"),
        "ranks": ns.ddp,
        "device": device,
    }


def print_report(summary: dict[str, Any]) -> None:
    n = summary["ranks"]
    backend = "NCCL, one GPU per rank" if summary.get("device") == "cuda" else "gloo on CPU"
    print(f"{n} ranks ({backend}) against one process")
    print(f"{'contender':32} {'1 proc ms':>10} {'x first':>8} {f'{n} ranks ms':>11} {'x first':>8}")
    for r in summary["rows"]:
        print(
            f"{r['label']:32} {r['ms_1']:10.1f} {r['ratio_1']:8.3f} {r[f'ms_{n}']:11.1f} {r[f'ratio_{n}']:8.3f}"
        )
    by_label = {r["label"]: r for r in summary["rows"]}
    for r in summary["rows"]:
        plain = by_label.get(r["optim"])
        if r["max_grad_norm"] > 0 and plain is not None and plain is not r:
            print(
                f"{r['label']} / {plain['label']}: {r['ms_1'] / plain['ms_1']:.3f} on one process, "
                f"{r[f'ms_{n}'] / plain[f'ms_{n}']:.3f} under DDP"
            )
    added = ", ".join(
        f"{r['label']} {r[f'ms_{n}'] - r['ms_1']:+.1f}"
        + (" (DDP's reducer)" if r[f"wrapped_{n}"] != r["wrapped_1"] else "")
        for r in summary["rows"]
    )
    print(f"added per step by {n} ranks, ms: {added}")
    for r in summary["rows"]:
        a = r.get("averaging")
        if a:
            print(
                f"{r['label']}: bucketed averaging under DDP holds {a['buffer_mib']:.1f} MiB of buckets, sends "
                f"{a['collectives_per_step']:.1f} all-reduces a step and waits {a['wait_ms_per_step']:.1f} ms "
                "a step for averages (communication not overlapped)"
            )
    comm = summary.get("communication_s")
    if comm:
        print(
            f"communication alone, {n} ranks, every gradient of the model once: one blocking all-reduce per "
            f"gradient {comm['per_tensor'] * 1e3:.1f} ms, one flat all-reduce {comm['flat'] * 1e3:.1f} ms, "
            f"buckets {comm['bucketed'] * 1e3:.1f} ms"
        )


def main(ns: argparse.Namespace) -> int:
    try:
        summary = measure(ns)
    except (LookupError, ImportError, ValueError, RuntimeError) as exc:
        print(f"optitrainer bench --ddp: {exc}")
        return 2
    print_report(summary)
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / "ddp.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        sys.exit("usage: optitrainer bench --ddp N ...  (this module's --worker is for torchrun)")
