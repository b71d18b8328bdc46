"""The "APOLLO" examples of the transformers Optimizers guide, run with OptiTrainer (offline, CPU).

Run from the repository root:  python examples/guide/apollo.py

Both guide examples -- APOLLO (`optim="apollo_adamw"`) and APOLLO-Mini (`optim="apollo_adamw"` with
`optim_args="proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200"`) -- as in the
guide, except: OptiTrainingArguments/OptiTrainer in place of TrainingArguments/Trainer, a tiny Llama
built from a config and generated token sequences instead of a hub model and dataset, 3 steps
instead of 100, CPU, no reporting, and a temporary output directory. Then APOLLO-Mini once more by
its own name, `optim="apollo_mini"`, which trains to the very same numbers.
"""

import tempfile

import torch  # noqa: F401  (the guide's import)

from optitrainer import OptiTrainer, OptiTrainingArguments
from optitrainer.testing import SyntheticLMDataset, tiny_llama

OUT = tempfile.mkdtemp(prefix="guide-apollo-")


def train(args: OptiTrainingArguments) -> list[float]:
    model = tiny_llama()  # guide: a pretrained causal LM from the hub
    trainer = OptiTrainer(model=model, args=args, train_dataset=SyntheticLMDataset(n=64))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    projected = [g for g in trainer.optimizer.optimizer.param_groups if "rank" in g and g["params"]]
    n_proj = sum(len(g["params"]) for g in projected)
    print(
        f"{args.run_name}: optim={args.optim!r} rank={projected[0]['rank']} "
        f"scale_type={projected[0]['scale_type']} scale={projected[0]['scale']:g}, "
        f"{n_proj} projected nn.Linear weights; final loss after {trainer.state.global_step} steps: {losses[-1]:.4f}"
    )
    return losses


# --- the guide's APOLLO example ---------------------------------------------------------------------
args = OptiTrainingArguments(
    output_dir=f"{OUT}/test-apollo",
    max_steps=3,  # guide: 100
    per_device_train_batch_size=2,
    optim="apollo_adamw",
    optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
    logging_strategy="steps",
    logging_steps=1,
    learning_rate=2e-5,
    save_strategy="no",
    run_name="apollo_adamw",
    use_cpu=True,
    report_to="none",
)
train(args)

# --- the guide's APOLLO-Mini example ----------------------------------------------------------------
args = OptiTrainingArguments(
    output_dir=f"{OUT}/test-apollo_mini",
    max_steps=3,  # guide: 100
    per_device_train_batch_size=2,
    optim="apollo_adamw",
    optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
    optim_args="proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200",
    logging_steps=1,  # not in the guide: log every step to print the loss
    run_name="apollo_mini (guide's optim_args)",
    use_cpu=True,
    report_to="none",
)
mini_by_args = train(args)

# --- APOLLO-Mini by name: the same preset, no optim_args needed ------------------------------------
args = OptiTrainingArguments(
    output_dir=f"{OUT}/test-apollo_mini-by-name",
    max_steps=3,
    per_device_train_batch_size=2,
    optim="apollo_mini",
    optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
    logging_steps=1,
    save_strategy="no",
    run_name="apollo_mini (by name)",
    use_cpu=True,
    report_to="none",
)
mini_by_name = train(args)
print(f"optim='apollo_mini' == the guide's APOLLO-Mini optim_args: {mini_by_name == mini_by_args}")
