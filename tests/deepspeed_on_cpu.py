"""DeepSpeed on a machine without an accelerator, for the scripts the tests launch (``apply()`` first).

Two test-harness shims, neither of which touches the training math:

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


def apply() -> None:
    from accelerate.state import PartialState

    prepare_backend = PartialState._prepare_backend

    def backend_for_deepspeed_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
        backend, distributed_type = prepare_backend(self, cpu, sagemaker_dp, backend)
        if backend is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            backend = "gloo"
        return backend, distributed_type

    PartialState._prepare_backend = backend_for_deepspeed_on_cpu
    # `import deepspeed.comm.torch` would bind deepspeed.comm's `torch` attribute (the torch package)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
