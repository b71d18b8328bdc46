"""Run under ``torchrun --nproc_per_node 2``: DDP training on CPU (gloo) with OptiTrainer.

Each rank writes its final parameters and the error a layerwise optimizer raised to ``OUT/rank<r>.pt``.
"""

import os
import sys

import torch

from optitrainer import IncompatibleConfigError, OptiTrainer
from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments

out = sys.argv[1]
rank = int(os.environ["RANK"])
common = {"ddp_backend": "gloo", "max_steps": 4, "logging_steps": 1}

refused = ""
try:
    training_arguments(os.path.join(out, "lw"), optim="adamw_torch_layerwise", **common)
except IncompatibleConfigError as exc:
    refused = str(exc)

args = training_arguments(os.path.join(out, "run"), optim="adamw_torch", **common)
assert args.world_size == 2, args.world_size
# a different init per rank would be caught by DDP's broadcast; different data per rank comes from the sampler
trainer = OptiTrainer(model=tiny_llama(seed=0), args=args, train_dataset=SyntheticLMDataset())
trainer.train()
params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
torch.save({"params": params, "refused": refused, "losses": losses}, os.path.join(out, f"rank{rank}.pt"))
