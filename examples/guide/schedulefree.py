"""The "Schedule Free" example of the transformers Optimizers guide, with OptiTrainer.

The guide's arguments, with OptiTrainingArguments in place of TrainingArguments (which also accepts the
guide's name ``schedule_free_radamw``, an alias of ``schedule_free_radam`` that transformers itself
rejects), a tiny Llama and generated data, 3 steps on the CPU. Run from the repository root:

    python examples/guide/schedulefree.py
"""

import os
import sys
import tempfile

# Run as a script, this file's folder comes first on sys.path and this file, named schedulefree.py,
# would shadow the upstream `schedulefree` package: drop the folder from the path.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from optitrainer import OptiTrainer, OptiTrainingArguments  # noqa: E402
from optitrainer.testing import SyntheticLMDataset, tiny_llama  # noqa: E402

output_dir = tempfile.mkdtemp(prefix="test-schedulefree-")  # the guide writes "./test-schedulefree"

args = OptiTrainingArguments(
    output_dir=output_dir,
    max_steps=6,  # the guide: 1000 (6: past the ~4 steps where RAdam does not move the weights yet)
    per_device_train_batch_size=4,
    optim="schedule_free_radamw",
    lr_scheduler_type="constant",
    gradient_checkpointing=True,
    logging_strategy="steps",
    logging_steps=1,
    learning_rate=2e-6,
    save_strategy="no",
    run_name="sfo",
    use_cpu=True,
    report_to="none",
)

trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset())
result = trainer.train()

optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
mode = "train" if optimizer.param_groups[0]["train_mode"] else "eval (averaged weights, ready to use)"
logs = [h for h in trainer.state.log_history if "loss" in h]
print(f"optim={args.optim!r} built {type(optimizer).__name__}")
print(
    "learning rate applied per step (RAdam's rectification warms up by itself):",
    [h["learning_rate"] for h in logs],
)
print(f"optimizer mode after training: {mode}")
print(f"final loss: {logs[-1]['loss']:.4f} (mean over the run: {result.training_loss:.4f})")
