"""`make bench-gpu` on a machine without a GPU: everything up to the CUDA call is checked."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_gpu_argv() -> list[str]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        [make, "-s", "-n", "bench-gpu"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    argv = shlex.split(out.stdout.strip())
    assert Path(argv[0]).name == "optitrainer" and argv[1] == "bench", argv
    return argv[2:]


def test_the_gpu_model_config_is_a_1b_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    argv = _bench_gpu_argv()
    config = AutoConfig.from_pretrained(ROOT / argv[argv.index("--model") + 1], local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert 1.0e9 < sum(p.numel() for p in model.parameters()) < 1.2e9
    assert (
        argv[argv.index("--dtype") + 1] == "bfloat16" and argv[argv.index("--baseline") + 1] == "transformers"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run `make bench-gpu` itself")
def test_without_cuda_every_name_resolves_and_the_command_stops_at_the_cuda_call(capsys, tmp_path):
    from optitrainer.bench import main

    argv = _bench_gpu_argv()
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    assert main(argv) == 2
    assert "--device cuda: this machine has no CUDA device" in capsys.readouterr().out
    # the names are resolved before the refusal: a misspelled one is what gets reported
    i = argv.index("--optim") + 1
    argv[i] = argv[i].replace("adamw_torch_fused", "adamw_torch_fusd")
    assert main(argv) == 2
    assert "adamw_torch_fusd" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # nothing ran
