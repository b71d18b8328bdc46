"""optim="grokadamw": the specification of the plugin, as tests.

* parity with ``transformers.Trainer`` where both agree (default betas/eps, no evaluation);
* the training arguments' betas/eps reach the optimizer (transformers drops them);
* the same update as upstream ``grokadamw.GrokAdamW``, bit for bit;
* standard state: ``weights_only`` checkpoints, exact resume, state on the parameter's device
  (upstream: dead parameter copies in the checkpoint, silent restart, CPU round trips);
* the grokking signal is fed by the trainer's train/eval losses and changes the update
  (under transformers it is always 0);
* the guide's example runs.
"""

from __future__ import annotations

import ast
import math
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

import optitrainer
from optitrainer import InvalidOptimArgsError, OptiTrainer, OptiTrainingArguments, UnknownOptimizerError
from optitrainer.testing import (
    SyntheticLMDataset,
    assert_same_run,
    max_param_diff,
    run_training,
    tiny_llama,
    training_arguments,
)

PLUGIN = Path(__file__).resolve().parents[1]
REPO = PLUGIN.parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TRANSFORMERS = {"trainer_cls": Trainer, "arguments_cls": TrainingArguments}


@pytest.fixture(autouse=True)
def _quiet():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class NoiseDataset(torch.utils.data.Dataset):
    """Uniformly random tokens: nothing to learn, so its loss stays above the training loss."""

    def __init__(self, n: int = 8, seq_len: int = 16, seed: int = 123):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, optitrainer.testing.TINY_VOCAB, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


# -- registration and options ----------------------------------------------------------------------


def test_resolved_from_this_distribution_without_importing_upstream():
    resolved = optitrainer.get_optimizer("grokadamw")
    assert resolved.provenance.distribution == "optitrainer-grokadamw"
    assert resolved.spec.transformers_name == "grokadamw"
    # `optitrainer list` imports the spec module: it must not import torch or grokadamw at module level
    tree = ast.parse((PLUGIN / "optitrainer_grokadamw" / "__init__.py").read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"torch", "grokadamw", "transformers"}, top_level


def test_options_default_to_transformers_values_and_typos_name_the_fix():
    spec = optitrainer.get_optimizer("grokadamw").spec
    assert {o.name: o.default for o in spec.options} == {
        "alpha_init": 0.98,
        "lamb": 2.0,
        "gamma": 0.1,
        "grokking_signal_decay_rate": 0.1,
        "gradient_clipping": 1.0,
    }
    with pytest.raises(InvalidOptimArgsError, match="did you mean 'alpha_init'"):
        OptiTrainingArguments(output_dir="unused", optim="grokadamw", optim_args="alpha=0.5", use_cpu=True)
    with pytest.raises(UnknownOptimizerError, match="cannot run layerwise.*Use optim='grokadamw'"):
        OptiTrainingArguments(output_dir="unused", optim="grokadamw_layerwise", use_cpu=True)


# -- parity with transformers.Trainer ------------------------------------------------------------------


def test_parity_with_transformers_trainer(tmp_path):
    # default adam_beta1/2 and adam_epsilon equal upstream's defaults, the only values transformers uses;
    # without evaluation the grokking signal is 0 in both
    ref = run_training("grokadamw", tmp_path / "ref", steps=20, weight_decay=0.1, **TRANSFORMERS)
    opti = run_training("grokadamw", tmp_path / "opti", steps=20, weight_decay=0.1)
    assert_same_run(ref, opti)
    assert len(opti.losses) == 20
    logged = [h["grokking_signal"] for h in opti.trainer.state.log_history if "loss" in h]
    assert logged == [0.0] * 20


def test_training_arguments_betas_eps_and_options_reach_the_optimizer(tmp_path):
    settings = {
        "adam_beta1": 0.8,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-6,
        "weight_decay": 0.05,
        "optim": "grokadamw",
        "optim_args": "alpha_init=0.9,lamb=1.5,gamma=0.2,grokking_signal_decay_rate=0.3,gradient_clipping=0.5",
    }

    def groups(trainer_cls, arguments_cls):
        args = training_arguments(tmp_path, arguments_cls=arguments_cls, **settings)
        trainer = trainer_cls(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8))
        trainer.create_optimizer()
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        return [
            {**{k: v for k, v in g.items() if k != "params"}, "names": {names[id(p)] for p in g["params"]}}
            for g in opt.param_groups
        ]

    ours, theirs = groups(OptiTrainer, OptiTrainingArguments), groups(Trainer, TrainingArguments)
    for g in ours:
        assert tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-6
    # transformers passes only lr and the five options: betas/eps silently fall back to upstream's defaults
    for g in theirs:
        assert tuple(g["betas"]) == (0.9, 0.999) and g["eps"] == 1e-8
    for o, t in zip(ours, theirs):
        # the rest is the same: the options, and weight decay only on the decay group (no biases/norms)
        for key in ("lr", "weight_decay", "alpha_init", "lamb", "gamma", "grokking_signal_decay_rate"):
            assert o[key] == t[key], key
        assert o["gradient_clipping"] == t["gradient_clipping"] == 0.5
        assert o["names"] == t["names"]
    assert ours[0]["weight_decay"] == 0.05 and ours[1]["weight_decay"] == 0.0
    assert not any("norm" in n for n in ours[0]["names"]) and any("norm" in n for n in ours[1]["names"])


# -- the optimizer class vs upstream -----------------------------------------------------------------

SHAPES = [(8, 4), (4,), (3, 5), (6,), (2, 2, 3)]


def _pair(**kwargs):
    """Upstream and our optimizer over identical parameters (two groups, as the trainer builds them)."""
    from grokadamw import GrokAdamW as Upstream
    from optitrainer_grokadamw import GrokAdamW

    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    out = []
    for cls in (Upstream, GrokAdamW):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "weight_decay": 0.0}]
        out.append((ps, cls(groups, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, **kwargs)))
    return out


def _set_grads(params_list, step: int, gen: torch.Generator, skip: set[int] = frozenset()):
    for i, shape in enumerate(SHAPES):
        grad = None if i in skip else torch.randn(shape, generator=gen) * (5.0 if step % 2 else 0.1)
        for params in params_list:
            params[i].grad = None if grad is None else grad.clone()


def _step_both(pairs, steps: int, gen: torch.Generator, first: int = 0, losses=None):
    for step in range(first, first + steps):
        # a parameter without a gradient at step 0 shifts the per-position beta1 of the others
        _set_grads([p for p, _ in pairs], step, gen, skip={1} if step == 0 else set())
        if losses is not None and step >= 2:
            for _, opt in pairs:
                for group in opt.param_groups:  # upstream's documented keys; ours are the same
                    group["train_loss"], group["eval_loss"] = losses
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # upstream's deprecated torch.cuda.amp.autocast()
            for _, opt in pairs:
                opt.step()


@pytest.mark.parametrize(
    "kwargs, losses",
    [
        ({}, None),
        ({}, (1.0, 1.7)),  # the default signal from the losses: 0.7 / 1.7
        ({"grokking_signal_fns": [lambda: 0.4, lambda: None, lambda: 0.2]}, None),
        ({"gradient_clipping": 0.0, "gamma": 0.3, "lamb": 0.5}, (2.0, 1.0)),
    ],
    ids=["plain", "loss-signal", "signal-fns", "no-clipping"],
)
def test_update_is_upstreams_bit_for_bit(kwargs, losses):
    (up_params, up), (our_params, ours) = pairs = _pair(**kwargs)
    _step_both(pairs, 6, torch.Generator().manual_seed(1), losses=losses)
    for a, b in zip(up_params, our_params):
        assert torch.equal(a, b)
    up_state = {id(p): s for g in up.param_groups for p, s in g["state"].items()}
    for a, b in zip(up_params, our_params):
        for key in ("exp_avg", "exp_avg_sq", "grok_ema"):
            assert torch.equal(up_state[id(a)][key], ours.state[b][key]), key
        assert up_state[id(a)]["step"] == ours.state[b]["step"]
    if losses == (1.0, 1.7):
        assert ours.last_grokking_signal == pytest.approx(0.7 / 1.7)
    if "grokking_signal_fns" in kwargs:
        assert ours.last_grokking_signal == pytest.approx(0.3)


def test_state_is_standard_loads_weights_only_and_resumes(tmp_path):
    (up_params, up), (our_params, ours) = pairs = _pair()
    gen = torch.Generator().manual_seed(1)
    _step_both(pairs, 3, gen)

    sd = ours.state_dict()
    assert all("state" not in g and "grokking_signal_fns" not in g for g in sd["param_groups"])
    assert sorted(sd["state"]) == list(range(len(SHAPES)))
    assert {s["step"] for s in sd["state"].values()} == {3, 2}  # the parameter skipped at step 0
    torch.save(sd, tmp_path / "ours.pt")
    torch.save(up.state_dict(), tmp_path / "upstream.pt")
    # the state tensors only; upstream adds a copy of every parameter (its dict keys)
    ours_bytes = sum(
        t.numel() * t.element_size() for s in sd["state"].values() for t in s.values() if torch.is_tensor(t)
    )
    assert ours_bytes == 3 * sum(p.numel() * p.element_size() for p in our_params)
    up_keys = [
        k for g in torch.load(tmp_path / "upstream.pt", weights_only=True)["param_groups"] for k in g["state"]
    ]
    assert len(up_keys) == len(SHAPES) and all(isinstance(k, torch.nn.Parameter) for k in up_keys)

    # reload both into fresh optimizers over copies of the current parameters, continue 3 steps
    (_, up2), (_, ours2) = fresh = _pair()
    for (params, _), src in zip(fresh, (up_params, our_params)):
        with torch.no_grad():
            for p, s in zip(params, src):
                p.copy_(s)
    up2.load_state_dict(torch.load(tmp_path / "upstream.pt", weights_only=True))
    ours2.load_state_dict(torch.load(tmp_path / "ours.pt", weights_only=True))
    gen_state = gen.get_state()
    _step_both(pairs, 3, gen, first=3)
    _step_both(fresh, 3, torch.Generator().set_state(gen_state), first=3)
    assert all(torch.equal(a, b) for a, b in zip(our_params, fresh[1][0])), "ours must resume exactly"
    # upstream's reloaded state is keyed by the dead copies: every parameter restarts at step 1
    assert not all(torch.equal(a, b) for a, b in zip(up_params, fresh[0][0]))
    live = {id(p) for p in fresh[0][0]}
    assert {s["step"] for g in up2.param_groups for k, s in g["state"].items() if id(k) in live} == {3}


def test_upstream_checkpoint_state_is_migrated():
    (up_params, up), (our_params, ours) = pairs = _pair()
    gen = torch.Generator().manual_seed(1)
    _step_both([pairs[0]], 4, gen, first=1)  # from step 1: every parameter has a gradient
    with torch.no_grad():
        for a, b in zip(our_params, up_params):
            a.copy_(b)
    ours.load_state_dict(up.state_dict())  # what transformers.Trainer wrote, in upstream's format
    assert {s["step"] for s in ours.state.values()} == {4}
    _step_both(pairs, 3, gen, first=5)
    assert all(torch.equal(a, b) for a, b in zip(up_params, our_params))


def test_state_stays_on_the_parameters_device():
    """The meta device stands in for CUDA: no state may be created on, or copied through, the CPU."""
    from grokadamw import GrokAdamW as Upstream
    from optitrainer_grokadamw import GrokAdamW
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
                Copies.count += 1
            return func(*args, **(kwargs or {}))

    def meta_param():
        p = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
        p.grad = torch.empty(4, 3, device="meta")
        return p

    p = meta_param()
    opt = GrokAdamW([p])
    with Copies():
        opt.step()
        opt.step()
    assert Copies.count == 0
    assert {v.device.type for v in opt.state[p].values() if torch.is_tensor(v)} == {"meta"}
    assert opt.state[p]["step"] == 2
    # upstream keeps its state on the CPU and copies it back and forth at every step
    with pytest.raises(NotImplementedError, match="meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Upstream([meta_param()]).step()


def test_bench_script_runs_and_agrees():
    bench = runpy.run_path(str(PLUGIN / "bench.py"))["bench"]
    assert bench("cpu", params=2, size=8, steps=2)["identical"] == 1.0


# -- the grokking signal, fed from the trainer ---------------------------------------------------------


def test_callback_feeds_losses_to_the_signal():
    from optitrainer_grokadamw import GrokAdamW, GrokkingSignalCallback

    opt = GrokAdamW([torch.nn.Parameter(torch.zeros(2))])
    (callback,) = optitrainer.get_optimizer("grokadamw").spec.callbacks(opt)
    assert isinstance(callback, GrokkingSignalCallback)
    assert opt.grokking_signal() == 0.0  # nothing fed yet
    callback.on_log(None, None, None, logs={"loss": 2.0, "learning_rate": 1e-3})
    assert opt.grokking_signal() == 0.0  # no evaluation yet
    callback.on_evaluate(None, None, None, metrics={"eval_loss": 3.0, "eval_runtime": 0.1})
    assert opt.grokking_signal() == pytest.approx(1.0 / 3.0)
    callback.on_log(None, None, None, logs={"eval_val_loss": 1.0})  # evaluating a dict of datasets
    assert opt.grokking_signal() == 0.0  # eval below train: clipped at 0
    assert opt.param_groups[0]["train_loss"] == 2.0 and opt.param_groups[0]["eval_loss"] == 1.0


def test_signal_from_train_and_eval_losses_changes_the_update(tmp_path):
    k = 4  # evaluate at step k; the signal acts from step k + 1
    settings = {
        "steps": k + 2,
        "learning_rate": 1e-2,
        "eval_strategy": "steps",
        "eval_steps": k,
        "per_device_eval_batch_size": 8,
        "eval_dataset": NoiseDataset(),
    }
    ref = run_training("grokadamw", tmp_path / "ref", **settings, **TRANSFORMERS)
    opti = run_training("grokadamw", tmp_path / "opti", **settings)
    logs = {h["step"]: h for h in opti.trainer.state.log_history if "loss" in h}
    evals = {h["step"]: h["eval_loss"] for h in opti.trainer.state.log_history if "eval_loss" in h}
    train_k, eval_k = logs[k]["loss"], evals[k]
    assert eval_k > train_k
    expected = (eval_k - train_k) / eval_k  # upstream's default signal
    assert [logs[s]["grokking_signal"] for s in range(1, k + 1)] == [0.0] * k
    assert logs[k + 1]["grokking_signal"] == pytest.approx(expected, rel=1e-6) and expected > 0.01
    assert opti.trainer.optimizer.optimizer.param_groups[0]["eval_loss"] == evals[max(evals)]

    # transformers never feeds the losses: its signal stays 0
    up = ref.trainer.optimizer.optimizer
    assert up._compute_grokking_signal(up.param_groups[0]) == 0.0
    # same run up to the first step that uses the signal (step k+1: its loss is computed before the update)
    assert opti.losses[: k + 1] == ref.losses[: k + 1]
    assert opti.losses[k + 1 :] != ref.losses[k + 1 :]
    assert max_param_diff(opti.params, ref.params) > 1e-6


def test_grokking_signal_fns_replace_the_loss_signal(tmp_path):
    """Callables cannot be optim_args: set them on the built optimizer (documented in the README)."""
    args = training_arguments(tmp_path, optim="grokadamw", max_steps=2)
    trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8))
    trainer.create_optimizer().grokking_signal_fns = [lambda: 0.5, lambda: 0.25]
    trainer.train()
    assert [h["grokking_signal"] for h in trainer.state.log_history if "loss" in h] == [0.375, 0.375]


# -- checkpoints through the trainer --------------------------------------------------------------------


def test_resume_equals_uninterrupted_with_weights_only_checkpoint(tmp_path):
    n = 4
    settings = {
        "eval_strategy": "steps",
        "eval_steps": n,
        "eval_dataset": NoiseDataset(),
        "learning_rate": 1e-2,
    }
    straight = run_training("grokadamw", tmp_path / "straight", steps=2 * n, **settings)
    first = run_training(
        "grokadamw", tmp_path / "split", steps=2 * n, save_strategy="steps", save_steps=n, **settings
    )
    ckpt = tmp_path / "split" / f"checkpoint-{n}"
    resumed = run_training(
        "grokadamw", tmp_path / "split", steps=2 * n, resume_from_checkpoint=str(ckpt), **settings
    )
    # the resumed trainer carries the first half's log history; the second half is what it trained
    assert len(resumed.losses) == 2 * n
    assert_same_run(resumed, straight)
    assert resumed.eval_losses == straight.eval_losses
    # the signal (fed by step n's evaluation) was active right after the resume, from the checkpoint
    signals = [h["grokking_signal"] for h in resumed.trainer.state.log_history if "loss" in h]
    assert signals[n] > 0

    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {s["step"] for s in sd["state"].values()} == {n}
    assert all(g["eval_loss"] is not None and g["train_loss"] is not None for g in sd["param_groups"])
    # three state tensors per parameter and nothing else of size
    size = os.path.getsize(ckpt / "optimizer.pt")
    assert 3.0 <= size / _param_bytes(first.trainer.model) < 3.3


def test_transformers_checkpoint_holds_parameter_copies_and_restarts(tmp_path):
    from grokadamw import GrokAdamW as Upstream
    from optitrainer_grokadamw import GrokAdamW

    n = 3
    ref = run_training("grokadamw", tmp_path, steps=n, save_strategy="steps", save_steps=n, **TRANSFORMERS)
    path = tmp_path / f"checkpoint-{n}" / "optimizer.pt"
    model_bytes = _param_bytes(ref.trainer.model)
    # three state tensors plus a pickled copy of every parameter (the keys of upstream's per-group dict)
    assert os.path.getsize(path) / model_bytes >= 4.0
    sd = torch.load(path, weights_only=True)
    assert sd["state"] == {}

    def fresh(cls):
        model = tiny_llama()
        model.load_state_dict(ref.trainer.model.state_dict())
        args = training_arguments(tmp_path / "x", arguments_cls=TrainingArguments, optim="grokadamw")
        trainer = Trainer(model=model, args=args, train_dataset=SyntheticLMDataset(n=8))
        groups = [
            {"params": g["params"], "weight_decay": g["weight_decay"]}
            for g in trainer.create_optimizer().param_groups
        ]
        opt = cls(groups, lr=1e-3)
        opt.load_state_dict(torch.load(path, weights_only=True))
        return opt

    up = fresh(Upstream)
    # after loading, upstream's state is keyed by the loaded copies: no live parameter finds its state
    assert all(g["state"].get(p) is None for g in up.param_groups for p in g["params"])
    # optitrainer's GrokAdamW moves that state to the parameters it belongs to
    ours = fresh(GrokAdamW)
    assert len(ours.state) == len(list(ref.trainer.model.parameters()))
    assert {s["step"] for s in ours.state.values()} == {n}
    assert math.isclose(
        sum(float(s["exp_avg_sq"].sum()) for s in ours.state.values()),
        sum(float(s["exp_avg_sq"].sum()) for g in sd["param_groups"] for s in g["state"].values()),
    )


# -- the guide's example -----------------------------------------------------------------------------


def test_guide_example_runs():
    script = REPO / "examples" / "guide" / "grokadamw.py"
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "optimizer: optitrainer_grokadamw.optimizer.GrokAdamW" in proc.stdout
    assert "final loss after 3 steps:" in proc.stdout
