"""optim="adam_mini": the specification of the plugin, as tests.

* the structure (hidden size, heads, KV heads, head size) comes from the model: nothing to write;
* every parameter of a Llama lands in the block Adam-mini means for it (checked on the real state);
* the same numbers as upstream ``adam_mini.Adam_mini`` given the same arguments in ``transformers.Trainer``;
* the trainer's weight-decay decision reaches every parameter;
* head_dim != hidden / heads is split per head (upstream's dim*dim/n_heads is not);
* models it cannot partition are refused before step 1, naming the fix;
* exact resume, layerwise == standard (the kit), and the optimizer state is ~half AdamW's.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

import optitrainer
from optitrainer import IncompatibleConfigError, OptiTrainer
from optitrainer.testing import (
    ConformanceCase,
    SyntheticLMDataset,
    assert_learns,
    assert_same_run,
    check_layerwise_matches_standard,
    check_resume,
    run_training,
    tiny_llama,
    training_arguments,
)

PLUGIN = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def _quiet():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def _built(tmp_path, model=None, trainer_cls=OptiTrainer, **overrides):
    args = training_arguments(tmp_path, **{"optim": "adam_mini", **overrides})
    trainer = trainer_cls(model=model or tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8))
    return trainer, trainer.create_optimizer()


def _one_step(trainer, optimizer):
    batch = SyntheticLMDataset(n=4).input_ids
    trainer.model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()


def test_resolved_from_this_distribution_without_importing_upstream():
    resolved = optitrainer.get_optimizer("adam_mini")
    assert resolved.provenance.distribution == "optitrainer-adam-mini"
    for module in ("__init__.py", "structure.py"):  # what listing and validation import
        tree = ast.parse((PLUGIN / "optitrainer_adam_mini" / module).read_text())
        top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert not top & {"torch", "adam_mini", "transformers"}, (module, top)


# -- the partition, read on the optimizer state after one step --------------------------------------

#: second-moment shape per parameter of the tiny Llama (hidden 32, 4 heads, 2 KV heads, head 8, vocab 97)
EXPECTED = {
    "model.embed_tokens.weight": (97, 1),  # one per token
    "lm_head.weight": (97, 1),  # one per token
    "self_attn.q_proj.weight": (4, 1),  # one per head
    "self_attn.k_proj.weight": (2, 1),  # one per KV head
    "self_attn.v_proj.weight": (16, 1),  # one per output neuron
    "self_attn.o_proj.weight": (32, 1),
    "mlp.gate_proj.weight": (64, 1),
    "mlp.up_proj.weight": (64, 1),
    "mlp.down_proj.weight": (32, 1),
    "input_layernorm.weight": (),  # one per tensor
    "post_attention_layernorm.weight": (),
    "model.norm.weight": (),
}


def _expected(name: str) -> tuple[int, ...]:
    return next(v for k, v in EXPECTED.items() if name.endswith(k))


def test_every_llama_parameter_lands_in_its_block_and_gets_the_trainers_weight_decay(tmp_path):
    model = tiny_llama(attention_bias=True)  # biases too: plain Adam
    trainer, opt = _built(tmp_path, model=model, weight_decay=0.1)
    _one_step(trainer, opt)
    decay = set(trainer.get_decay_parameter_names(model))
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in opt.param_groups:
        (p,) = group["params"]
        name, state = names[id(p)], opt.state[p]
        seen.add(name)
        if name.endswith(".bias"):
            assert state["v"].shape == p.shape, name
        else:
            assert tuple(state["vmean"].shape) == _expected(name), name
        assert state["m"].numel() == p.numel(), name
        assert group["weight_decay"] == (0.1 if name in decay else 0.0), name
    assert seen == set(names.values())
    assert sum(n.endswith(".bias") for n in seen) == 8  # q, k, v, o of two layers
    assert not any("norm" in n or n.endswith("bias") for n in decay)


def test_head_dim_from_the_config_splits_per_head_where_upstream_does_not(tmp_path):
    from adam_mini import Adam_mini

    model = tiny_llama(head_dim=16)  # q_proj (64, 32): 4 heads of 16 x 32
    trainer, opt = _built(tmp_path, model=model)
    _one_step(trainer, opt)
    q, k = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.k_proj.weight
    assert tuple(opt.state[q]["vmean"].shape) == (4, 1) and tuple(opt.state[k]["vmean"].shape) == (2, 1)
    # upstream's block is dim * dim / n_heads = 256 elements: 8 half-heads
    upstream = Adam_mini(model.named_parameters(), dim=32, n_heads=4, n_kv_heads=2, verbose=False)
    assert q.numel() // upstream.head_numel == 8


def test_structure_overrides_and_the_message_when_the_model_says_nothing():
    from optitrainer_adam_mini.structure import Structure, read_structure

    bare = torch.nn.Linear(2, 2)  # no .config
    none = {"dim": None, "n_heads": None, "n_kv_heads": None, "head_dim": None}
    structure, problems = read_structure(bare, none)
    assert structure is None
    assert (
        "no hidden_size (optim_args 'dim') and no num_attention_heads (optim_args 'n_heads')" in problems[0]
    )
    assert "optim_args='dim=<hidden size>, n_heads=<attention heads>" in problems[0]
    given = read_structure(bare, {**none, "dim": 64, "n_heads": 8, "n_kv_heads": 2})
    assert given == (Structure(64, 8, 2, 8), [])
    assert (
        "not a multiple of 3 key/value heads"
        in read_structure(bare, {**none, "dim": 64, "n_heads": 8, "n_kv_heads": 3})[1][0]
    )
    # optim_args win over the config
    assert read_structure(tiny_llama(), {**none, "n_kv_heads": 4})[0] == Structure(32, 4, 4, 8)


def test_a_model_whose_names_it_cannot_partition_is_refused_before_step_one(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(IncompatibleConfigError, match="found no query/key weight.*optim='adamw_torch'"):
        _built(tmp_path, model=gpt2)


# -- parity with upstream, called directly in transformers.Trainer -----------------------------------

SETTINGS = {
    "adam_beta1": 0.8,
    "adam_beta2": 0.95,
    "adam_epsilon": 1e-6,
    "weight_decay": 0.1,
    "warmup_steps": 2,
}


class UpstreamAdamMiniTrainer(Trainer):
    """What a user writes without the plugin: upstream's constructor with the model's numbers."""

    def create_optimizer(self, model=None):
        from adam_mini import Adam_mini

        a = self.args
        self.optimizer = Adam_mini(
            self.model.named_parameters(),
            lr=a.learning_rate,
            betas=(a.adam_beta1, a.adam_beta2),
            eps=a.adam_epsilon,
            weight_decay=a.weight_decay,
            dim=32,
            n_heads=4,
            n_kv_heads=2,
            verbose=False,
        )
        return self.optimizer


def test_same_numbers_as_upstream_in_transformers_trainer(tmp_path):
    # on Llama names upstream's weight-decay rule ("norm"/"ln"/"bias") and transformers' agree
    ref = run_training(
        "adamw_torch",
        tmp_path / "ref",
        steps=12,
        trainer_cls=UpstreamAdamMiniTrainer,
        arguments_cls=TrainingArguments,
        **SETTINGS,
    )
    ours = run_training("adam_mini", tmp_path / "ours", steps=12, **SETTINGS)
    assert_same_run(ref, ours)
    assert ref.learning_rates == ours.learning_rates
    assert_learns(ours, min_drop=0.01)


def test_a_trainers_own_weight_decay_rule_is_followed(tmp_path):
    class NoDecayOnEmbeddings(OptiTrainer):
        def get_decay_parameter_names(self, model):
            return [
                n for n in super().get_decay_parameter_names(model) if "embed" not in n and "lm_head" not in n
            ]

    _, opt = _built(tmp_path, trainer_cls=NoDecayOnEmbeddings, weight_decay=0.1)
    decays = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert (
        decays["model.embed_tokens.weight"] == decays["lm_head.weight"] == decays["model.norm.weight"] == 0.0
    )
    assert decays["model.layers.0.self_attn.q_proj.weight"] == 0.1


# -- the kit, and memory ---------------------------------------------------------------------------


def test_resume_is_exact(tmp_path):
    check_resume(ConformanceCase("adam_mini"), tmp_path)


def test_layerwise_equals_standard(tmp_path):
    # each parameter is its own param group with its own state; nothing crosses parameters
    check_layerwise_matches_standard(ConformanceCase("adam_mini_layerwise"), tmp_path, steps=6)


def _state_bytes(optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )


def test_state_is_about_half_of_adamw(tmp_path):
    trainer, opt = _built(tmp_path)
    _one_step(trainer, opt)
    adamw_trainer, adamw = _built(tmp_path, optim="adamw_torch")
    _one_step(adamw_trainer, adamw)
    params = sum(p.numel() for p in trainer.model.parameters())
    assert params == 24_800
    # AdamW: exp_avg + exp_avg_sq per element, and a float32 step per tensor (21)
    assert _state_bytes(adamw) == 2 * 4 * params + 21 * 4 == 198_484
    # Adam-mini: m per element; v: 97 + 97 tokens, per layer 4 + 2 heads, 16 + 32 + 64 + 64 + 32 rows, 5 norms
    v_values = 97 + 97 + 2 * (4 + 2 + 16 + 32 + 64 + 64 + 32) + 5
    assert _state_bytes(opt) == 4 * params + 4 * v_values == 101_708
    assert 1 - _state_bytes(opt) / _state_bytes(adamw) == pytest.approx(0.4876, abs=1e-4)


def test_upstream_distributed_reduction_is_off():
    # upstream all-reduces the norm blocks across torch.cuda.device_count() "ranks": a crash in one process
    # on a multi-GPU machine; under DDP each rank already holds the whole parameter and averaged gradient
    args = SimpleNamespace(
        learning_rate=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8
    )
    from optitrainer_adam_mini.build import build

    from optitrainer.plugin import BuildContext

    opt = build(BuildContext(model=tiny_llama(), args=args, options={}, name="adam_mini"))
    assert opt.world_size == 1 and opt.head_numel == 8 * 32
