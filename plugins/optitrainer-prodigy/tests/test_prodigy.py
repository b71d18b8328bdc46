"""optim="prodigy" (alias "prodigyopt"): the specification of the plugin, as tests.

* every upstream constructor argument is reachable: typed options with upstream's defaults, betas/eps/
  weight decay from the training arguments, decay groups as transformers builds them;
* the same numbers as upstream ``prodigyopt.Prodigy`` in ``transformers.Trainer``, bit for bit;
* recommended learning rate 1.0; a learning rate that makes it a no-op is refused when the arguments
  are built (measured: the transformers default 5e-5 does not move the loss, 1.0 does);
* its step-size estimate d lives in the param groups: checkpointed, resumed exactly, logged;
* no layerwise form (d is global); fsdp_in_use is not an option (always False).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

import optitrainer
from optitrainer import (
    IncompatibleConfigError,
    InvalidOptimArgsError,
    OptiTrainingArguments,
    UnknownOptimizerError,
)
from optitrainer.testing import (
    ConformanceCase,
    SyntheticLMDataset,
    assert_same_run,
    check_resume,
    run_training,
    tiny_llama,
)

PLUGIN = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def _quiet():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def test_resolved_by_name_and_alias_without_importing_upstream():
    by_name, by_alias = optitrainer.get_optimizer("prodigy"), optitrainer.get_optimizer("prodigyopt")
    assert by_name.spec is by_alias.spec and by_name.provenance.distribution == "optitrainer-prodigy"
    assert by_name.spec.recommended_lr == 1.0
    tree = ast.parse((PLUGIN / "optitrainer_prodigy" / "__init__.py").read_text())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert not top & {"torch", "prodigyopt", "transformers"}, top


def test_every_constructor_argument_is_an_option_or_a_training_argument_with_upstreams_default():
    from prodigyopt import Prodigy

    upstream = {k: p.default for k, p in inspect.signature(Prodigy).parameters.items()}
    from_training_arguments = {"params", "lr", "betas", "eps", "weight_decay"}
    fixed = {"fsdp_in_use"}  # False: FSDP/ZeRO are refused, and DDP needs no all-reduce of its sums
    options = {o.name: o.default for o in optitrainer.get_optimizer("prodigy").spec.options}
    assert set(upstream) == from_training_arguments | fixed | set(options)
    # growth_rate=None stands for upstream's inf (options must be finite)
    assert {k: (float("inf") if k == "growth_rate" and v is None else v) for k, v in options.items()} == {
        k: upstream[k] for k in options
    }


def test_layerwise_is_not_offered():
    with pytest.raises(UnknownOptimizerError, match="cannot run layerwise"):
        OptiTrainingArguments(output_dir="unused", optim="prodigy_layerwise", learning_rate=1.0, use_cpu=True)


# -- the learning rate ----------------------------------------------------------------------------


@pytest.mark.parametrize("optim", ["prodigy", "prodigyopt"])
def test_the_transformers_default_learning_rate_is_refused_naming_the_fix(optim):
    with pytest.raises(
        IncompatibleConfigError, match=r"learning_rate=5e-05 makes Prodigy a near no-op.*Set learning_rate=1"
    ):
        OptiTrainingArguments(output_dir="unused", optim=optim, use_cpu=True)  # learning_rate left at 5e-5
    with pytest.raises(IncompatibleConfigError, match=r"learning_rate=0.0001 makes"):
        OptiTrainingArguments(output_dir="unused", optim=optim, learning_rate=1e-4, use_cpu=True)
    OptiTrainingArguments(output_dir="unused", optim=optim, learning_rate=1.0, use_cpu=True)


def test_fsdp_in_use_is_not_an_option():
    with pytest.raises(InvalidOptimArgsError, match="unknown key 'fsdp_in_use'"):
        OptiTrainingArguments(
            output_dir="unused",
            optim="prodigy",
            learning_rate=1.0,
            optim_args="fsdp_in_use=True",
            use_cpu=True,
        )


def _fixed_batch_run(lr: float, steps: int) -> tuple[float, float, float]:
    """Upstream Prodigy on one batch: (loss before, loss after, largest weight change)."""
    from prodigyopt import Prodigy

    model, batch = tiny_llama(), SyntheticLMDataset(n=8).input_ids
    init = [p.detach().clone() for p in model.parameters()]
    opt = Prodigy(model.parameters(), lr=lr)
    with torch.no_grad():
        before = model(input_ids=batch, labels=batch).loss.item()
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = model(input_ids=batch, labels=batch).loss.item()
    return before, after, max(float((p - q).abs().max()) for p, q in zip(model.parameters(), init))


def test_why_small_learning_rates_are_refused():
    # step = lr x d, and d only leaves d0 = 1e-6 once lr x (its accumulated sums) exceeds 1
    steps = 15
    before, at_default, moved_default = _fixed_batch_run(5e-5, steps)
    _, at_one, moved_one = _fixed_batch_run(1.0, steps)
    assert moved_default < 1e-7 and abs(before - at_default) < 1e-5, (moved_default, before, at_default)
    assert at_one < 0.75 * before and moved_one > 0.01, (before, at_one, moved_one)


# -- parity with upstream ---------------------------------------------------------------------------

SETTINGS = {
    "learning_rate": 1.0,
    "adam_beta1": 0.8,
    "adam_beta2": 0.95,
    "adam_epsilon": 1e-6,
    "weight_decay": 0.1,
}
ALL_OPTIONS = {
    "d0": 1e-5,
    "d_coef": 2.0,
    "growth_rate": 1.05,
    "beta3": 0.99,
    "use_bias_correction": True,
    "safeguard_warmup": True,
    "decouple": False,
    "slice_p": 3,
}


def _upstream_trainer(options: dict):
    class UpstreamProdigyTrainer(Trainer):
        """What a user writes without the plugin: transformers' decay groups, upstream's class."""

        def create_optimizer(self, model=None):
            from prodigyopt import Prodigy

            a, decay = self.args, set(self.get_decay_parameter_names(self.model))
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": a.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            self.optimizer = Prodigy(
                groups, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon, **options
            )
            return self.optimizer

    return UpstreamProdigyTrainer


@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["defaults", "every_option"])
def test_same_numbers_as_upstream_in_transformers_trainer(tmp_path, options):
    kw = {**SETTINGS, "warmup_steps": 2, "lr_scheduler_type": "constant_with_warmup"}
    ref = run_training(
        "adamw_torch",
        tmp_path / "ref",
        steps=10,
        trainer_cls=_upstream_trainer(options),
        arguments_cls=TrainingArguments,
        **kw,
    )
    ours = run_training("prodigy", tmp_path / "ours", steps=10, optim_args=options, **kw)
    assert_same_run(ref, ours)
    d_ref = ref.trainer.optimizer.param_groups[0]["d"]
    assert ours.trainer.optimizer.param_groups[0]["d"] == d_ref > options.get("d0", 1e-6)
    # the estimate is logged at every step and is the optimizer's
    logged = [h["prodigy_d"] for h in ours.trainer.state.log_history if "loss" in h]
    assert len(logged) == 10 and logged[-1] == d_ref


# -- the d state across a restart -----------------------------------------------------------------------


def test_resume_is_exact_and_the_checkpoint_holds_d(tmp_path):
    check_resume(ConformanceCase("prodigy", {"learning_rate": 1.0}), tmp_path)
    saved = torch.load(tmp_path / "half" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    for group in saved["param_groups"]:
        # k counts steps that moved: the kit's warmup runs step 1 at lr 0, where upstream returns early
        assert group["k"] == 3 and group["d_numerator"] != 0.0  # the running sums behind d
        assert {"d", "d_max", "d_hat", "d_denom"} <= set(group)
