"""TRL's own scripts (``trl/scripts/sft.py``, ``dpo.py``, ``grpo.py``), changed only as the README says.

The README's recipe: ``with_optitrainer(SFTConfig)`` for the arguments and ``OptiTrainerMixin`` mixed into
the trainer. The scripts are the installed TRL's, rewritten by :func:`optitrainized` with exactly those
two changes; they load a tiny Llama, its tokenizer and the data from local folders (nothing is
downloaded), save checkpoints, and a second launch resumes from one. GRPO's reward is a function in a
module written next to the script (``--reward_funcs grpo_reward.first_words``, a dotted path the script
imports; the script's folder is on ``sys.path``), and it generates on the CPU with ``transformers``
(no vLLM).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from safetensors.torch import load_file  # noqa: E402
from test_trl import WORDS, dpo_data, grpo_data, make_tokenizer, sft_data  # noqa: E402

from optitrainer.testing import tiny_llama  # noqa: E402

SCRIPTS = Path(trl.__file__).parent / "scripts"
CONFIG = {"sft": "SFTConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig"}
TRAINER = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer"}
DATA = {"sft": sft_data, "dpo": dpo_data, "grpo": grpo_data}
#: a reward that varies from sample to sample (a constant one gives zero advantages and no update)
REWARD_MODULE = f"""FIRST = set({WORDS[: len(WORDS) // 2]!r})


def first_words(completions, **_):
    return [sum(w in FIRST for w in c.split()) / max(len(c.split()), 1) for c in completions]
"""
#: per kind, the script's own arguments beyond the common ones
EXTRA = {
    "sft": ["--max_length", "16"],
    "dpo": ["--max_length", "16"],
    # 2 prompts x 2 completions of at most 4 tokens per step (the batch of 4 divides by num_generations)
    "grpo": ["--reward_funcs", "grpo_reward.first_words", "--num_generations", "2", "--max_completion_length", "4"],
}  # fmt: skip


def optitrainized(kind: str) -> str:
    """TRL's script with the README's two changes (and nothing else)."""
    source = (SCRIPTS / f"{kind}.py").read_text()
    config, trainer = CONFIG[kind], TRAINER[kind]
    # 1. the arguments: OptiXConfig = with_optitrainer(XConfig), in the parser's dataclasses (the first is
    #    ScriptArguments, or grpo.py's GRPOScriptArguments)
    source, n = re.subn(
        rf"dataclass_types = \((\w*ScriptArguments), {config},",
        rf"from optitrainer import with_optitrainer\n\n    dataclass_types = (\1, with_optitrainer({config}),",
        source,
    )
    assert n == 1, f"trl's {kind}.py changed: its parser's dataclass_types line is not where the test expects"
    # 2. the trainer: class OptiXTrainer(OptiTrainerMixin, XTrainer)
    source, n = re.subn(
        rf"(\n    from trl import {trainer}[^\n]*\n)",
        rf"\1    from optitrainer import OptiTrainerMixin\n\n    class Opti{trainer}(OptiTrainerMixin, {trainer}):\n"
        rf"        pass\n\n    {trainer} = Opti{trainer}\n",
        source,
    )
    assert n == 1, (
        f"trl's {kind}.py changed: its `from trl import {trainer}` line is not where the test expects"
    )
    return source


@pytest.fixture(scope="module")
def local_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _data(kind: str, root: Path) -> Path:
    folder = root / f"{kind}-data"
    folder.mkdir()
    rows = DATA[kind]().to_list()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _run(script: Path, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_trls_script_saves_checkpoints_that_load_back_and_resume(kind, tmp_path, local_model):
    script = tmp_path / f"{kind}.py"
    script.write_text(optitrainized(kind))
    if kind == "grpo":  # importable by its dotted path: the script's folder is sys.path[0]
        (tmp_path / "grpo_reward.py").write_text(REWARD_MODULE)
    out = tmp_path / "out"
    common = [
        "--model_name_or_path", str(local_model), "--dataset_name", str(_data(kind, tmp_path)),
        "--output_dir", str(out), "--optim", "adamw_torch_layerwise", "--learning_rate", "1e-3",
        "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--per_device_train_batch_size", "4",
        "--use_cpu", "--bf16", "False", "--report_to", "none", "--logging_steps", "1",
        "--seed", "0", "--dataloader_num_workers", "0", *EXTRA[kind],
    ]  # fmt: skip
    _run(script, *common)
    ckpt = out / "checkpoint-2"
    assert (ckpt / "training_args.bin").is_file() and (out / "model.safetensors").is_file()
    code = (
        "import torch, sys; a = torch.load(sys.argv[1], weights_only=False); print(type(a).__name__, a.optim)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code, str(ckpt / "training_args.bin")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert loaded == [f"Opti{CONFIG[kind]}", "adamw_torch_layerwise"]
    straight = load_file(out / "model.safetensors")
    initial = load_file(local_model / "model.safetensors")
    assert any((straight[k] != initial[k]).any() for k in straight), (
        "training left the weights where they were"
    )
    # a second launch of the script resumes from step 2 and ends on the same weights
    _run(script, *common[:5], str(tmp_path / "resumed"), *common[6:], "--resume_from_checkpoint", str(ckpt))
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all((straight[k] == resumed[k]).all() for k in straight)
