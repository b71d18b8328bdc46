"""The contract with transformers/accelerate: declared ranges tested, hooks checked, every override called."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import Trainer

from optitrainer import OptiTrainer, UnsupportedVersionError
from optitrainer import trainer_contract as contract
from optitrainer.layerwise import LayerwiseOptimizer
from optitrainer.testing import (
    SyntheticLMDataset,
    assert_same_run,
    run_training,
    tiny_llama,
    training_arguments,
)
from optitrainer.trainer import OptiTrainerMixin

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, SpecifierSet]:
    """The ``dependencies`` of pyproject.toml (read as text: Python 3.10, the floor, has no tomllib)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    reqs = [Requirement(r) for r in re.findall(r'"([^"]+)"', block.group(1))]
    return {r.name: r.specifier for r in reqs}


def _floor_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "floor.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_pyproject_declares_the_ranges_the_trainer_enforces():
    declared = _declared()
    for dist, spec in contract.SUPPORTED.items():
        assert declared[dist] == SpecifierSet(spec), dist


def test_the_floor_run_pins_every_declared_floor():
    """`make test-floor` installs exactly the lowest version each requirement allows (so the floor is tested)."""
    pins = _floor_pins()
    for dist, spec in _declared().items():
        floors = [s.version for s in spec if s.operator == ">="]
        assert floors, f"{dist} declares no floor"
        assert Version(pins[dist]) == Version(floors[0]), dist
    text = (ROOT / "Makefile").read_text()
    assert "3.10" in re.search(r"^FLOOR_PYTHON \?=.*$", text, re.M).group(0)  # requires-python's floor


def test_every_trainer_override_is_in_the_contract():
    """A method OptiTrainerMixin overrides is checked when the trainer is built (else it can silently die)."""
    overrides = {n for n in vars(OptiTrainerMixin) if hasattr(Trainer, n) and not n.startswith("__")}
    hooked = {h.name for h in contract.HOOKS if h.owner == "Trainer"}
    assert overrides <= hooked, overrides - hooked


def test_this_environment_satisfies_the_contract():
    assert contract.environment_problems() == ([], [])


def _counting(monkeypatch, names):
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = vars(OptiTrainerMixin)[name]

        def counted(self, *args, __name=name, __original=original, **kwargs):
            calls[__name] += 1
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(OptiTrainerMixin, name, counted)
    return calls


#: overrides that answer scripts and frameworks; OptiTrainer's own training never needs them
#: (tests/test_optimizer_class.py has transformers' create_optimizer use the answer)
ANSWERS_FOR_CALLERS = {"get_optimizer_cls_and_kwargs"}


def test_each_override_is_called_by_this_transformers_trainer(tmp_path, monkeypatch):
    """Train with checkpoints, then resume: transformers must call every method OptiTrainer overrides."""
    overrides = sorted(
        n
        for n in vars(OptiTrainerMixin)
        if hasattr(Trainer, n) and not n.startswith("__") and n not in ANSWERS_FOR_CALLERS
    )
    calls = _counting(monkeypatch, overrides)
    backward_calls = []
    original_backward = LayerwiseOptimizer.backward

    def backward(self, *args, **kwargs):
        backward_calls.append(1)
        return original_backward(self, *args, **kwargs)

    monkeypatch.setattr(LayerwiseOptimizer, "backward", backward)
    common = dict(max_grad_norm=1.0, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    full = run_training("adamw_torch_layerwise", tmp_path / "a", steps=4, **common)
    assert len(backward_calls) == 4  # training_step's accelerator.backward reached the engine
    resumed = run_training(
        "adamw_torch_layerwise",
        tmp_path / "a",
        steps=4,
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"),
        **common,
    )
    never = [n for n, c in calls.items() if c == 0]
    assert not never, f"transformers {transformers.__version__} never called the override(s) {never}"
    # and they did their job: the norm measured in backward is logged, the resumed run continues exactly
    assert all(g is not None and g > 0 for g in full.grad_norms)
    assert_same_run(resumed, full)


def _build(tmp_path, **kw):
    args = training_arguments(tmp_path, optim="adamw_torch_layerwise", max_steps=2, **kw)
    return OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset())


def _trainer_init_must_not_run(monkeypatch):
    def untouched(self, *a, **k):
        raise AssertionError("Trainer.__init__ ran: the refusal came after the model was touched")

    monkeypatch.setattr(Trainer, "__init__", untouched)


def test_a_release_missing_a_hook_is_refused_before_the_model_is_touched(tmp_path, monkeypatch):
    monkeypatch.delattr(Trainer, "_clip_grad_norm")  # what transformers 5.0-5.2 look like
    _trainer_init_must_not_run(monkeypatch)
    with pytest.raises(UnsupportedVersionError) as info:
        _build(tmp_path)
    msg = str(info.value)
    assert "Trainer._clip_grad_norm is missing" in msg and "gradient norm measured inside backward" in msg
    assert "transformers>=5.3,<6" in msg and "pip install 'transformers>=5.3,<6'" in msg
    assert isinstance(info.value, ImportError)


def test_a_hook_whose_parameters_changed_is_refused(tmp_path, monkeypatch):
    def create_optimizer(self):  # transformers 5.2's signature: no model
        raise AssertionError("never called")

    monkeypatch.setattr(Trainer, "create_optimizer", create_optimizer)
    monkeypatch.setenv(contract.ALLOW_UNTESTED_ENV, "1")  # hooks are refused whatever it says
    _trainer_init_must_not_run(monkeypatch)
    with pytest.raises(UnsupportedVersionError, match=r"Trainer.create_optimizer takes \(self\), expected"):
        _build(tmp_path)


def test_a_release_outside_the_range_is_refused_unless_allowed(tmp_path, monkeypatch):
    current = Version(transformers.__version__).public
    monkeypatch.setitem(contract.SUPPORTED, "transformers", f">{current}")
    with pytest.raises(UnsupportedVersionError) as info:
        _build(tmp_path)
    msg = str(info.value)
    assert f"transformers {transformers.__version__} (supported: >{current})" in msg
    assert f"{contract.ALLOW_UNTESTED_ENV}=1" in msg
    monkeypatch.setenv(contract.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match="was not tested with transformers"):
        trainer = _build(tmp_path)
    trainer.train()  # every hook is present: it trains


def test_the_installed_release_is_accepted_exactly_when_it_is_in_range(tmp_path):
    """Real releases, no patching: `make test-floor` also runs this after forcing transformers 5.2.0 in."""
    in_range = Version(Version(transformers.__version__).public) in SpecifierSet(
        contract.SUPPORTED["transformers"]
    )
    if in_range:
        _build(tmp_path).train()
        return
    with pytest.raises(UnsupportedVersionError) as info:
        _build(tmp_path)
    msg = str(info.value)
    assert f"transformers {transformers.__version__} (supported: >=5.3,<6)" in msg
    assert "pip install 'transformers>=5.3,<6'" in msg


def test_a_training_step_that_skips_accelerator_backward_is_refused(tmp_path, monkeypatch):
    def training_step(self, model, inputs, num_items_in_batch=None):
        # a Trainer whose step calls loss.backward() itself: the engine's backward (clipping) never runs
        model.train()
        loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        loss.backward()
        return loss.detach()

    monkeypatch.setattr(Trainer, "training_step", training_step)
    trainer = _build(tmp_path, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="ran without calling accelerator.backward"):
        trainer.train()
