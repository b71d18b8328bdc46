"""The opening example of the transformers Optimizers guide, run with OptiTrainer (offline, CPU).

Run from the repository root:  python examples/guide/intro.py

The guide's TrainingArguments with OptiTrainingArguments in place, a tiny Llama built from a config and
generated token sequences instead of a hub model and dataset, 3 steps instead of 1000, on CPU.
"""

import tempfile

import torch  # noqa: F401  (the guide's import)

from optitrainer import OptiTrainer, OptiTrainingArguments
from optitrainer.testing import SyntheticLMDataset, tiny_llama

OUT = tempfile.mkdtemp(prefix="guide-intro-")

args = OptiTrainingArguments(
    output_dir=f"{OUT}/test-optimizer",
    max_steps=3,  # guide: 1000
    per_device_train_batch_size=4,
    logging_strategy="steps",
    logging_steps=1,
    learning_rate=2e-5,
    save_strategy="no",
    run_name="optimizer-name",
    use_cpu=True,
    report_to="none",
)
trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=64))
trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print(f"optim={args.optim!r}: final loss after {trainer.state.global_step} steps: {losses[-1]:.4f}")
