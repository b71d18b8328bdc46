"""The transformers Optimizers guide's GrokAdamW example, with OptiTrainer, offline.

Run from the repository root:  python examples/guide/grokadamw.py

As in the guide, except: OptiTrainingArguments/OptiTrainer in place of TrainingArguments/Trainer, a
tiny generated Llama and dataset instead of a hub model, 3 steps instead of 1000, CPU, no reporting,
and a temporary output directory.
"""

import os
import sys
import tempfile

# This file is named like the upstream package: keep its folder off the import path, or
# `import grokadamw` inside the plugin would import this script instead of the optimizer.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import torch  # noqa: E402, F401  (the guide's import)

from optitrainer import OptiTrainer, OptiTrainingArguments  # noqa: E402
from optitrainer.testing import SyntheticLMDataset, tiny_llama  # noqa: E402

args = OptiTrainingArguments(
    output_dir=tempfile.mkdtemp(prefix="test-grokadamw-"),
    max_steps=3,
    per_device_train_batch_size=4,
    optim="grokadamw",
    logging_strategy="steps",
    logging_steps=1,
    learning_rate=2e-5,
    save_strategy="no",
    run_name="grokadamw",
    use_cpu=True,
    report_to="none",
)

trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=64))
trainer.train()

logs = [h for h in trainer.state.log_history if "loss" in h]
print(
    f"optimizer: {type(trainer.optimizer.optimizer).__module__}.{type(trainer.optimizer.optimizer).__name__}"
)
print(f"final loss after {trainer.state.global_step} steps: {logs[-1]['loss']:.4f}")
print(f"grokking signal (no evaluation, so 0): {logs[-1]['grokking_signal']:g}")
