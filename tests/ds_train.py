"""Run ``dist_train.py`` (same arguments) under DeepSpeed on a machine without an accelerator.

Launched by ``torchrun`` or ``accelerate launch`` in place of ``dist_train.py``. Two test-harness
shims, neither of which touches the training math:

* accelerate picks no process-group backend when ``cpu=False`` and no GPU is present: its state then
  says ``num_processes=1`` while ``deepspeed.comm`` runs every rank, so the data is not sharded and
  DeepSpeed's batch check fails (``train_batch_size 4 != 4 * 1 * 2``). Here it gets ``gloo``, which is
  what ``deepspeed.comm`` itself uses on CPU. On a GPU machine accelerate picks ``nccl`` and this is a
  no-op.
* DeepSpeed's CPU backend JIT-compiles its shared-memory op ``deepspeed_shm_comm`` on first use
  (a minute or more, cached under ``~/.cache/torch_extensions``; no setting turns it off). Only
  ``inference_all_reduce`` uses it; training collectives go through ``torch.distributed`` (gloo), so
  skipping it leaves every result bit-identical.
"""

import importlib
import os
import runpy
import sys
from pathlib import Path

from accelerate.state import PartialState

_prepare_backend = PartialState._prepare_backend


def _backend_for_deepspeed_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
    backend, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if backend is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        backend = "gloo"
    return backend, distributed_type


PartialState._prepare_backend = _backend_for_deepspeed_on_cpu
# `import deepspeed.comm.torch` would bind deepspeed.comm's `torch` attribute (the torch package)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

script = Path(__file__).with_name("dist_train.py")
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
