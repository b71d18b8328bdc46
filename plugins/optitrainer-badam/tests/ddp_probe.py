"""Run under ``torchrun --nproc_per_node 2``: why ``badam`` refuses DDP.

``transformers.Trainer`` (DDP, gloo) trains with ``optitrainer_badam.BlockOptimizer`` passed in, 5 steps,
a block switch after step 1. Prints, on each rank, how far apart the two ranks' weights of each decoder
layer are at the end. ``python ddp_probe.py OUT FIND_UNUSED(0|1)``.
"""

import os
import sys

import torch
from optitrainer_badam.optimizer import BlockOptimizer
from transformers import Trainer, TrainingArguments

from optitrainer import release_gloo_workers_at_exit
from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments

out, find_unused = sys.argv[1], sys.argv[2] == "1"
model = tiny_llama()
args = training_arguments(
    out,
    arguments_cls=TrainingArguments,
    optim="adamw_torch",
    max_steps=5,
    ddp_find_unused_parameters=find_unused,
    ddp_backend="gloo",
)
base = torch.optim.AdamW(list(model.parameters()), lr=args.learning_rate, weight_decay=0.0)
optimizer = BlockOptimizer(
    base, list(model.named_parameters()), switch_block_every=2, switch_mode="ascending"
)
trainer = Trainer(model=model, args=args, train_dataset=SyntheticLMDataset(), optimizers=(optimizer, None))
release_gloo_workers_at_exit()  # plain Trainer: what OptiTrainer.train does, so the launch exits with 0
trainer.train()
assert torch.distributed.get_world_size() == 2 and trainer.state.global_step == 5
diffs = []
for layer in (0, 1):
    weights = torch.cat(
        [p.detach().flatten() for n, p in model.named_parameters() if f".layers.{layer}." in n]
    )
    both = [torch.zeros_like(weights) for _ in range(2)]
    torch.distributed.all_gather(both, weights)
    diffs.append(f"layers.{layer}={float((both[0] - both[1]).abs().max()):.3g}")
print(
    f"rank {os.environ['RANK']} find_unused={int(find_unused)}: rank difference {' '.join(diffs)}", flush=True
)
