"""transformers' own Trainer tests, vendored unchanged, run against OptiTrainer and plain Trainer.

The vendored files (``test_trainer_callback.py``, ``trainer_test_utils.py``; see README.md) are not collected
as they stand: ``test_callbacks_optitrainer.py`` and ``test_callbacks_transformers.py`` import them through
``_upstream.load`` with ``transformers.Trainer``/``TrainingArguments`` replaced by the variant's classes,
so each test runs twice and a difference between OptiTrainer and the baseline shows as one failing id.
Tests that need a GPU, the hub or an optional package skip through transformers' own decorators.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network, even when this folder runs alone

collect_ignore = ["test_trainer_callback.py", "trainer_test_utils.py"]
