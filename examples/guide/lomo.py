"""The "LOMO" example of the transformers Optimizers guide, run with OptiTrainer (offline, CPU).

Guide: `optim="adalomo"`, gradient checkpointing, learning_rate=2e-6. Only the model (a tiny
Llama built from a config), the dataset (generated token sequences) and the number of steps are
changed, plus `use_cpu=True` and `report_to="none"`. optitrainer's adalomo runs on CPU (upstream's
allocates its statistics with `.cuda()`) and, with the default max_grad_norm=1.0, really clips the
gradients (two backward passes per step; the guide's tip: set max_grad_norm=0 for speed).

    python examples/guide/lomo.py
"""

from optitrainer import OptiTrainer, OptiTrainingArguments
from optitrainer.testing import SyntheticLMDataset, tiny_llama


def main() -> float:
    args = OptiTrainingArguments(
        output_dir="./test-lomo",
        max_steps=3,  # guide: 1000
        per_device_train_batch_size=4,
        optim="adalomo",
        gradient_checkpointing=True,
        logging_strategy="steps",
        logging_steps=1,
        learning_rate=2e-6,
        save_strategy="no",
        run_name="adalomo",
        use_cpu=True,
        report_to="none",
    )
    model = tiny_llama()  # guide: a pretrained causal LM from the hub
    trainer = OptiTrainer(model=model, args=args, train_dataset=SyntheticLMDataset(n=64))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        print(
            f"step {h['step']}: loss={h['loss']:.4f} grad_norm={h.get('grad_norm')} lr={h['learning_rate']:.2e}"
        )
    final = logs[-1]["loss"]
    print(f"final loss: {final:.4f}")
    return final


if __name__ == "__main__":
    main()
