"""``make gpu-check`` (python -m optitrainer.bench.gpu_check) cannot rot: its dry run on the CPU is tested here.

* the dry run writes the table and the Markdown file; every CUDA-only row is listed as skipped, none
  vanishes, every other row passes its check;
* without CUDA the GPU mode refuses at once and names --dry-run;
* ``make -n gpu-wheels`` downloads every upstream package the checked names need (a new plugin cannot be
  forgotten) and builds optitrainer and every plugin; .whl/ is git-ignored;
* the rows the dry run skips still have their code exercised: the 8-bit state check with bitsandbytes on
  the CPU, and the AdaLomo-against-upstream comparison with upstream's ``.cuda()`` made a no-op.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from optitrainer.bench import gpu_check
from optitrainer.bench.gpu_checks import plan as gpu_plan
from optitrainer.bench.gpu_checks.table import OK, SKIPPED_DRY

ROOT = Path(__file__).resolve().parents[1]

#: the seed guide's optimizers the check must cover (the issue's list)
SEED_NAMES = {
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "adamw_torch_layerwise",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "adamw_bnb_8bit_layerwise",
    "paged_adamw_8bit_layerwise",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "apollo_adamw",
    "apollo_adamw_layerwise",
    "lomo",
    "adalomo",
    "schedule_free_adamw",
    "grokadamw",
    "stable_adamw",
}
#: names whose every row needs CUDA: bitsandbytes' 8-bit and paged states, 8-bit GaLore
CUDA_ONLY_NAMES = {n for n in SEED_NAMES if "bnb" in n or "paged" in n or "8bit" in n}
#: and the rows of other names that need CUDA: upstream AdaLomo allocates with .cuda()
CUDA_ONLY_ROWS = {("adalomo", "transformers"), ("adalomo", "check: = lomo-optim")}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-dry")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}  # a deadline set outside
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "optitrainer.bench.gpu_check", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out, time.perf_counter() - start


def test_dry_run_writes_the_table_and_the_markdown(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "optitrainer GPU check (dry run)" in proc.stdout and "PASS:" in proc.stdout
    md = (out / "gpu-check.md").read_text()
    assert md.startswith("# optitrainer GPU check (dry run)")
    assert "| optimizer | trainer | status | step ms | x transformers | peak | floor | peak/floor |" in md
    assert "device: CPU" in md and "torch " in md and "transformers " in md and "command: `" in md
    meta = json.loads((out / "gpu-check.json").read_text())["meta"]
    assert meta["wall_s"] < seconds + 1


def test_dry_run_lists_every_row_and_skips_only_the_cuda_only_ones(dry_run):
    _, out, _ = dry_run
    rows = json.loads((out / "gpu-check.json").read_text())["rows"]
    jobs = gpu_plan.plan(gpu_plan.dry_run_settings())
    assert [(r["optim"], r["trainer"]) for r in rows] == [(j.optim, j.trainer) for j in jobs]  # none vanished
    assert {r["optim"] for r in rows if r["trainer"] == "optitrainer"} == SEED_NAMES
    for r in rows:
        key = (r["optim"], r["trainer"])
        if r["optim"] in CUDA_ONLY_NAMES or key in CUDA_ONLY_ROWS:
            assert r["status"] == SKIPPED_DRY, key
        else:
            assert r["status"] == OK and r["passed"], (key, r["status"], r["error"], r["check"])
            assert r["check"] and "FAILED" not in r["check"], key
    assert CUDA_ONLY_ROWS <= {(r["optim"], r["trainer"]) for r in rows}
    checks = {r["optim"]: r["check"] for r in rows if r["trainer"].startswith("check:")}
    assert "logged grad_norm = plain backward's" in checks["adamw_torch_layerwise"]
    assert "update = torch SGD" in checks["lomo"] and "update = torch AdamW" in checks["adamw_torch_fused"]


def test_dry_run_rows_carry_the_figures(dry_run):
    _, out, _ = dry_run
    rows = {(r["optim"], r["trainer"]): r for r in json.loads((out / "gpu-check.json").read_text())["rows"]}
    ours, theirs = rows[("adamw_torch", "optitrainer")], rows[("adamw_torch", "transformers")]
    for r in (ours, theirs):
        assert r["step_ms"] > 0 and r["peak_bytes"] >= r["floor_bytes"] > 0 and r["final_loss"] > 0
    assert ours["ratio"] == pytest.approx(ours["step_ms"] / theirs["step_ms"])
    assert rows[("adamw_torch_layerwise", "optitrainer")]["ratio"] is None  # transformers has no such name
    # the floor counts one gradient for layerwise and fused-backward methods, all of them otherwise
    assert rows[("lomo", "optitrainer")]["details"]["floor"]["grad_rule"] == "largest"
    assert ours["details"]["floor"]["grad_rule"] == "all"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check runs instead of refusing")
def test_without_cuda_the_gpu_mode_refuses_at_once_and_names_the_dry_run(capsys, tmp_path):
    start = time.perf_counter()
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err
    assert time.perf_counter() - start < 5 and not (tmp_path / "out").exists()


def test_the_gpu_settings_train_the_1b_llama():
    from transformers import AutoModelForCausalLM

    from optitrainer.bench.gpu_checks.weights import model_config

    settings = gpu_plan.gpu_settings()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(settings.model))
    assert 1.0e9 < sum(p.numel() for p in model.parameters()) < 1.2e9
    assert (settings.device, settings.batch_size, settings.seq_len) == ("cuda", 4, 512)
    # the GaLore targets select the attention and MLP projections of the first two layers only
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    picked = [n for n in names if any(re.fullmatch(t, n) for t in gpu_plan.GALORE_TARGETS)]
    assert len(picked) == 14 and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in picked)


def _make_n(target: str) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    return subprocess.run([make, "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_gpu_wheels_downloads_every_upstream_the_checked_names_need():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from optitrainer.registry import REGISTRY

    commands = [shlex.split(line) for line in _make_n("gpu-wheels").splitlines() if " pip " in line]
    download = next(c for c in commands if "download" in c)
    build = next(c for c in commands if "wheel" in c)
    pins = [a.split("==") for a in download if "==" in a]
    pinned = {canonicalize_name(n): v for n, v in pins}
    assert len(pinned) == len(pins), "one version of each package (two stop the install)"
    for name in gpu_plan.checked_names():
        resolved = REGISTRY.resolve(name, check_installed=False)
        for requirement in map(Requirement, resolved.spec.requires):
            version = pinned.get(canonicalize_name(requirement.name))
            assert version is not None, f"{name} needs {requirement}: missing from `make gpu-wheels`"
            assert requirement.specifier.contains(version), (
                f"{name} needs {requirement}, gpu-wheels pins {version}"
            )
        dist = resolved.provenance.distribution
        source = "." if dist == "optitrainer" else f"plugins/{dist}"
        assert source in build, f"{dist} (provides {name}) is not built into a wheel by `make gpu-wheels`"
    assert "--no-deps" in download and "--only-binary=:all:" in download and "3.12" in download


def test_the_wheels_are_git_ignored_and_the_script_installs_them_without_make():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=ROOT)
    assert ignored.returncode == 0, ".whl/ must be in .gitignore"
    script = (ROOT / "tools" / "gpu_check.sh").read_text()
    assert "pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target" in script
    assert "-m optitrainer.bench.gpu_check" in script
    assert not any(line.strip().startswith("make") for line in script.splitlines()), (
        "make may be missing there"
    )
    assert "-m optitrainer.bench.gpu_check" in _make_n("gpu-check")


def test_the_8bit_state_check_holds_with_bitsandbytes_on_the_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from optitrainer.bench.gpu_checks.train import Context, train_and_measure
    from optitrainer.bench.gpu_checks.verify import summary, training_findings
    from optitrainer.bench.gpu_checks.weights import ModelSource
    from optitrainer.testing import tiny_llama_config

    # bitsandbytes keeps tensors under 4096 elements in 32 bits: the tiny Llama, twice as wide, has some above
    tiny_llama_config(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "wide")
    settings = gpu_plan.dry_run_settings()
    ctx = Context(settings, ModelSource(str(tmp_path / "wide"), torch.device("cpu")), str(tmp_path))
    job = next(j for j in gpu_plan.plan(settings, {"adamw_bnb_8bit"}) if j.trainer == "optitrainer")
    m = train_and_measure(ctx, job)
    ok, text = summary(training_findings(m, job.contender))
    assert ok and "8-bit states" in text, text


def test_the_adalomo_comparison_with_upstream_runs_with_cuda_calls_patched(tmp_path, monkeypatch):
    """The dry run skips it (upstream allocates with .cuda()); its code is exercised here on the CPU."""
    from optitrainer.bench.gpu_checks.exactness import run_check
    from optitrainer.bench.gpu_checks.train import Context
    from optitrainer.bench.gpu_checks.verify import summary
    from optitrainer.bench.gpu_checks.weights import ModelSource

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    settings = gpu_plan.dry_run_settings()
    ctx = Context(settings, ModelSource("tiny", torch.device("cpu")), str(tmp_path))
    check = next(c for c in gpu_plan.CHECKS if c.reference == "lomo-optim")
    outcome = run_check(ctx, check)
    ok, text = summary(outcome.findings)
    assert ok and "weights bit-identical" in text, text
    assert outcome.details["total"] == ctx.source.n_params


def test_a_row_past_its_limit_is_stopped_and_so_is_one_past_the_deadline():
    from optitrainer.bench.gpu_checks.budget import Budget, RowInterrupted

    def spin():
        while True:
            time.sleep(0.01)

    budget = Budget(seconds=60, started_at=time.time(), row_limit_s=0.2, min_slot_s=1)
    with pytest.raises(RowInterrupted, match="the 0.2 s limit of one row"), budget.limit():
        spin()
    assert budget.can_start()
    late = Budget(seconds=0.3, started_at=time.time(), row_limit_s=10, min_slot_s=0.1)
    with pytest.raises(RowInterrupted) as stopped, late.limit():
        spin()
    assert stopped.value.reason == "time budget" and not late.can_start()
