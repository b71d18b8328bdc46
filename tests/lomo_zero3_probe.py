"""What LOMO does under DeepSpeed ZeRO-3 when optitrainer's refusal is bypassed (launched by
``tests/test_deepspeed.py::test_lomo_fails_under_zero3_without_its_refusal``).

    torchrun --standalone --nproc_per_node 2 tests/lomo_zero3_probe.py OUT

Registers ``lomo_z3_probe``, the ``lomo`` spec claiming ZeRO-3, trains 4 steps on 2 CPU ranks under
``deepspeed=`` stage 3 (with the CPU shims of ``deepspeed_on_cpu.py``), and writes each rank's outcome to
``OUT/rank<r>.json``: the losses, or the error and where it was raised. Measured (deepspeed 0.19.8,
torch 2.13 CPU): both ranks fail in the first backward with ``AttributeError: 'NoneType' object has no
attribute 'numel'`` in ZeRO-3's own gradient hook (``stage3.py``, ``__add_grad_to_ipg_bucket``): LOMO's
hook has already updated the weight and freed its gradient. That is why ``lomo`` and ``adalomo`` are
refused under every ZeRO stage.
"""

import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

from deepspeed_on_cpu import apply

apply()

from optitrainer import OptiTrainer, register  # noqa: E402
from optitrainer.registry import REGISTRY  # noqa: E402
from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments  # noqa: E402

ZERO3 = {
    "zero_optimization": {"stage": 3},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def main(out: Path) -> None:
    spec = REGISTRY.resolve("lomo").spec
    caps = dataclasses.replace(spec.capabilities, distributed=frozenset({"ddp", "zero3"}))
    register(dataclasses.replace(spec, name="lomo_z3_probe", aliases=(), capabilities=caps), replace=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        args = training_arguments(
            out / "run", optim="lomo_z3_probe", max_steps=4, max_grad_norm=0.0,
            per_device_train_batch_size=2, learning_rate=1e-2, deepspeed=ZERO3,
        )  # fmt: skip
        trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset())
        trainer.train()
        result = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    except Exception as exc:  # noqa: BLE001 -- the outcome is what is measured
        result = {"error": f"{type(exc).__name__}: {exc}", "where": traceback.format_exc()[-2000:]}
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
