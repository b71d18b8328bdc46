"""The transformers Optimizers guide, section "StableAdamW", with OptiTrainer (offline).

Guide: https://huggingface.co/docs/transformers/optimizers#stableadamw
Needs: pip install optitrainer optitrainer-optimi   (optitrainer-optimi pulls torch-optimi)

Only the model (a tiny Llama built from a config), the dataset (generated token sequences) and the
number of steps differ from the guide; the arguments are the guide's.

Run from the repository root: python examples/guide/stable_adamw.py
"""

from optitrainer import OptiTrainer, OptiTrainingArguments
from optitrainer.testing import SyntheticLMDataset, tiny_llama

args = OptiTrainingArguments(
    output_dir="./test-stable-adamw",
    max_steps=3,  # the guide: 1000
    per_device_train_batch_size=4,
    optim="stable_adamw",
    gradient_checkpointing=True,
    logging_strategy="steps",
    logging_steps=1,
    learning_rate=2e-6,
    save_strategy="no",
    run_name="stable-adamw",
    use_cpu=True,
    report_to="none",
)

trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=64))
result = trainer.train()

optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print(f"optimizer: {type(optimizer).__module__}.{type(optimizer).__name__}")
print(f"losses: {', '.join(f'{x:.4f}' for x in losses)}; final loss: {losses[-1]:.4f}")
