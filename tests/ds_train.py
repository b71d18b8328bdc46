"""Run ``dist_train.py`` (same arguments) under DeepSpeed on a machine without an accelerator.

Launched by ``torchrun`` or ``accelerate launch`` in place of ``dist_train.py``, with the shims of
``deepspeed_on_cpu.py`` applied first.
"""

import runpy
import sys
from pathlib import Path

from deepspeed_on_cpu import apply

apply()
script = Path(__file__).with_name("dist_train.py")
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
