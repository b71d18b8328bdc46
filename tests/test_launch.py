"""A launch that starts fewer processes than asked for fails before step 1 instead of training alone."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

from launch import run_launcher, torchrun

from optitrainer.engine import Engine, launch_problem

MULTI_CPU_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
"""

SCRIPT = """\
import sys
from optitrainer import LaunchError, OptiTrainer
from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments

extra = {"use_cpu": False, "ddp_backend": "gloo"} if "--no-use-cpu" in sys.argv else {}
if "--bare" in sys.argv:  # `torchrun script.py` as a GPU recipe writes it: neither flag
    extra = {"use_cpu": False}
args = training_arguments("out", optim="adamw_torch", max_steps=2, **extra)
try:
    OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset()).train()
    print("TRAINED ALONE")
except LaunchError as exc:
    print("REFUSED:", exc)
"""


def test_accelerate_multi_cpu_config_without_mpi_is_refused(tmp_path):
    """accelerate's multi-CPU config without mpirun runs the script once: we refuse to train alone."""
    (tmp_path / "cfg.yaml").write_text(MULTI_CPU_CONFIG)
    (tmp_path / "train.py").write_text(textwrap.dedent(SCRIPT))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [accelerate, "launch", "--config_file", str(tmp_path / "cfg.yaml"), str(tmp_path / "train.py")]
    proc = run_launcher(cmd, timeout=180, env={"PYTHONPATH": str(tmp_path)})
    assert "TRAINED ALONE" not in proc.output
    assert "REFUSED: `accelerate launch` started this script as ONE process" in proc.output, proc.output[
        -3000:
    ]
    assert "accelerate launch --multi_gpu --num_processes N" in proc.output


def test_launch_problem_only_for_accelerates_single_process_launch(monkeypatch):
    for name in (
        "ACCELERATE_DYNAMO_BACKEND",
        "ACCELERATE_MIXED_PRECISION",
        "MASTER_PORT",
        "RANK",
        "WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert launch_problem(Engine()) is None  # a plain `python train.py`
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert launch_problem(Engine()) is None  # `accelerate launch` of one process: no MASTER_PORT
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert "ONE process" in launch_problem(Engine())
    monkeypatch.setenv("RANK", "0")  # a real multi-process launch sets the rank variables
    assert launch_problem(Engine()) is None
    assert launch_problem(Engine("ddp", 2)) is None


def test_torchrun_without_a_data_parallel_engine_is_refused(tmp_path):
    """Without GPUs and without use_cpu=True, accelerate splits the data but wraps nothing: ranks diverge."""
    (tmp_path / "train.py").write_text(textwrap.dedent(SCRIPT))
    proc = torchrun(tmp_path / "train.py", "--no-use-cpu", timeout=180)
    assert "TRAINED ALONE" not in proc.output
    assert proc.output.count("REFUSED: 2 processes run but accelerate set up no data-parallel engine") == 2
    assert "pass use_cpu=True" in proc.output


def test_torchrun_without_use_cpu_and_gloo_names_both_flags(tmp_path):
    """The plain GPU recipe on a machine without GPUs: the refusal names the flags, not DeepSpeed."""
    (tmp_path / "train.py").write_text(textwrap.dedent(SCRIPT))
    proc = torchrun(tmp_path / "train.py", "--bare", timeout=180)
    assert "TRAINED ALONE" not in proc.output
    refusals = [line for line in proc.output.splitlines() if line.startswith("REFUSED:")]
    assert len(refusals) == 2, proc.output[-3000:]
    assert all("pass --use_cpu --ddp_backend gloo" in r and "DeepSpeed" not in r for r in refusals)


def test_deepspeed_under_torchrun_on_cpu_is_refused_by_the_arguments_before_deepspeed_loads(tmp_path):
    """Refused when the arguments are built, before transformers imports DeepSpeed (whose first import
    compiles ops for minutes), with the launch that works named."""
    import json
    import os
    import subprocess

    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    code = textwrap.dedent(
        """
        import sys
        from optitrainer import LaunchError, OptiTrainingArguments
        try:
            OptiTrainingArguments("out", optim="adamw_torch", deepspeed="ds.json", report_to="none")
            print("BUILT")
        except LaunchError as exc:
            print("REFUSED:", exc)
        print("deepspeed imported:", "deepspeed" in sys.modules)
        """
    )
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    ).stdout
    assert "REFUSED: deepspeed='ds.json' under a 2-process launch on a machine without GPUs" in out, out
    assert "accelerate launch --config_file <DeepSpeed config>" in out
    assert "deepspeed imported: False" in out
