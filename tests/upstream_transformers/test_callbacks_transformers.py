"""transformers' tests/trainer/test_trainer_callback.py with plain ``transformers.Trainer``: the baseline."""

from upstream_transformers import _upstream

globals().update(_upstream.test_cases("transformers"))


def test_the_upstream_module_runs_plain_trainer():
    from transformers.trainer import Trainer
    from transformers.training_args import TrainingArguments

    mod = _upstream.load("transformers")
    assert mod.Trainer is Trainer
    assert mod.TrainingArguments is TrainingArguments


def test_the_vendored_files_are_unchanged():
    """The upstream copies stay verbatim (a `ruff format .` would rewrite them: see README.md)."""
    import hashlib

    expected = {
        "test_trainer_callback.py": "92b65e8cfceb25fdb9d2c9f933b261f3e28cb56aef1aece293ddca7740f2ec67",
        "test_trainer_optimizers.py": "48f09c15ff79666ed6a80d6df4c6a22ed615d0f4bf19e2d386bdf893cef9ba77",
        "trainer_test_utils.py": "5527b12c6bb02c9aa120dfa44227a9ae19984856fcb11a34dfb24b369e54e99b",
    }
    actual = {name: hashlib.sha256((_upstream.HERE / name).read_bytes()).hexdigest() for name in expected}
    assert actual == expected
