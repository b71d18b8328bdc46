"""Specification of optitrainer-bitsandbytes.

* every bitsandbytes name of transformers trains to exactly ``transformers.Trainer``'s numbers (20 steps,
  tiny Llama large enough for 8-bit states, CPU fp32): losses, grad norms, final weights and the dtype of
  every state tensor (the embedding's 32-bit override included);
* the embedding override lives in the optimizer, not in bitsandbytes' process-wide manager: nothing leaks
  to the next optimizer in the process, and nothing leaked by others reaches ours;
* ``optim_args`` are typed (RMSprop's, which transformers hands to bitsandbytes as strings, and
  AdEMAMix's); bad values are refused before training with the fix;
* ``<name>_layerwise`` == ``<name>`` bit for bit with 8-bit states (the kit's check);
* 2N straight == N + resume + N with 8-bit states, and the checkpoint loads with ``weights_only=True``;
* under DDP (2 CPU ranks) the ranks agree, resume is exact, and one process with the same batch is matched.

The default run samples the names; ``OPTITRAINER_BNB_FULL=1`` runs every name through every check.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import optitrainer
from optitrainer import IncompatibleConfigError, InvalidOptimArgsError, OptiTrainer
from optitrainer.testing import (
    ConformanceCase,
    SyntheticLMDataset,
    assert_learns,
    assert_same_run,
    check_layerwise_matches_standard,
    check_refusals,
    check_resume,
    max_param_diff,
    run_training,
    tiny_llama,
    training_arguments,
)

bnb = pytest.importorskip("bitsandbytes")

PLUGIN = Path(__file__).resolve().parents[1]
FULL = os.environ.get("OPTITRAINER_BNB_FULL", "").strip() not in ("", "0")
TF = {"trainer_cls": transformers.Trainer, "arguments_cls": transformers.TrainingArguments}

#: every canonical name (aliases: adamw_8bit -> adamw_bnb_8bit, rmsprop_bnb_32bit -> rmsprop_bnb)
NAMES = [
    "adamw_bnb_8bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "ademamix",
    "ademamix_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "lion_32bit",
    "lion_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
]
ALIASES = {"adamw_8bit": "adamw_bnb_8bit", "rmsprop_bnb_32bit": "rmsprop_bnb"}
#: what the default run checks (8-bit states, the embedding override on); OPTITRAINER_BNB_FULL=1: every name
PARITY_SAMPLE = ["adamw_bnb_8bit", "paged_ademamix_8bit", "lion_8bit", "rmsprop_bnb_8bit"]
LAYERWISE_SAMPLE = ["paged_ademamix_8bit"]
RESUME_SAMPLE = ["ademamix_8bit", "adamw_bnb_8bit_layerwise"]
#: learning rates at which each family visibly trains the tiny model in 20 steps
LR = {"adamw": 3e-3, "ademamix": 3e-3, "lion": 3e-4, "rmsprop": 1e-3}

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU:UserWarning")


def _sampled(names, sample):
    skip = pytest.mark.skip("sampled out of the default run; OPTITRAINER_BNB_FULL=1 runs it")
    return [n if FULL or n in sample else pytest.param(n, marks=skip) for n in names]


def _family(name: str) -> str:
    return next(f for f in ("adamw", "ademamix", "lion", "rmsprop") if f in name)


def _model(**overrides):
    # hidden 64: the embedding and head (97 x 64), q_proj (64 x 64) and the MLP reach bitsandbytes'
    # min_8bit_size (4096 elements), so they get 8-bit states; k/v_proj (2048) and norms stay 32-bit
    return tiny_llama(hidden_size=64, intermediate_size=128, **overrides)


@pytest.fixture(autouse=True)
def fresh_bnb_manager():
    """bitsandbytes' GlobalOptimManager is process-wide: transformers' reference runs write into it."""
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.initialize()
    yield manager
    manager.initialize()


def _inner(trainer) -> torch.optim.Optimizer:
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)


def _state_dtypes(optimizer, model) -> dict[str, tuple]:
    """``{parameter name: dtypes of its state1/state2}`` for one (non-layerwise) optimizer."""
    out = {}
    for n, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        out[n] = tuple(str(state[k].dtype) for k in ("state1", "state2") if k in state)
    return out


# --- 1. parity with transformers.Trainer ------------------------------------------------------------------


@pytest.mark.parametrize("name", _sampled(NAMES, PARITY_SAMPLE))
def test_matches_transformers_trainer(tmp_path, fresh_bnb_manager, name):
    s = {"learning_rate": LR[_family(name)], "weight_decay": 0.01, "warmup_steps": 3, "adam_beta2": 0.99}
    ref = run_training(name, tmp_path / "tf", steps=20, model=_model(), **TF, **s)
    fresh_bnb_manager.initialize()  # ours must not need what transformers left behind
    ours = run_training(name, tmp_path / "opti", steps=20, model=_model(), **s)
    assert type(_inner(ours.trainer)).__module__ == "optitrainer_bitsandbytes._optim"
    assert isinstance(_inner(ours.trainer), type(_inner(ref.trainer)))
    assert_same_run(ref, ours)  # identical losses and final weights (atol 0)
    assert ours.grad_norms == ref.grad_norms and ours.learning_rates == ref.learning_rates
    dtypes = _state_dtypes(_inner(ours.trainer), ours.trainer.model)
    assert dtypes == _state_dtypes(_inner(ref.trainer), ref.trainer.model)
    big = "torch.uint8" if "8bit" in name else "torch.float32"
    assert dtypes["model.layers.0.mlp.up_proj.weight"][0] == big
    assert dtypes["model.embed_tokens.weight"][0] == "torch.float32"  # transformers' override
    assert_learns(ours, min_drop=0.02)


def test_ademamix_optim_args_match_transformers(tmp_path, fresh_bnb_manager):
    """transformers' keys (its string parsing) and ours (typed) give the same optimizer and numbers."""
    optim_args = "beta1=0.8, beta3=0.999, alpha=4, eps=1e-6, t_alpha=6, t_beta3=6"
    s = {"learning_rate": 3e-3, "weight_decay": 0.01, "optim_args": optim_args}
    ref = run_training("ademamix_8bit", tmp_path / "tf", steps=8, model=_model(), **TF, **s)
    fresh_bnb_manager.initialize()
    ours = run_training("ademamix_8bit", tmp_path / "opti", steps=8, model=_model(), **s)
    group = _inner(ours.trainer).param_groups[0]
    got = (group["betas"], group["alpha"], group["eps"], group["t_alpha"], group["t_beta3"])
    assert got == ((0.8, 0.999, 0.999), 4.0, 1e-6, 6, 6)  # beta2: adam_beta2
    assert_same_run(ref, ours)


def test_rmsprop_options_are_typed_where_transformers_crashes(tmp_path):
    """transformers passes RMSprop's optim_args to bitsandbytes as strings; ours trains as bitsandbytes does."""
    optim_args = "alpha=0.9, momentum=0.5, eps=1e-6"
    with pytest.raises(TypeError, match="not supported between instances of 'float' and 'str'"):
        run_training("rmsprop_bnb", tmp_path / "tf", steps=1, optim_args=optim_args, **TF)

    # the reference: transformers.Trainer training bitsandbytes' own RMSprop, built by hand
    model, s = _model(), {"learning_rate": 1e-3, "weight_decay": 0.01, "max_steps": 8}
    args = training_arguments(tmp_path / "ref", **s)
    groups = [
        {"params": [p for n, p in model.named_parameters() if "norm" not in n], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if "norm" in n], "weight_decay": 0.0},
    ]
    upstream = bnb.optim.RMSprop(groups, lr=1e-3, alpha=0.9, momentum=0.5, eps=1e-6, optim_bits=8)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=SyntheticLMDataset(), optimizers=(upstream, None)
    )
    trainer.train()
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    # pure bitsandbytes has no embedding override: embeddings_32bit=False is that optimizer
    ours = run_training(
        "rmsprop_bnb_8bit",
        tmp_path / "opti",
        steps=8,
        model=_model(),
        optim_args=optim_args + ", embeddings_32bit=False",
        **{k: v for k, v in s.items() if k != "max_steps"},
    )
    assert max_param_diff(ref, ours.params) == 0.0
    assert (
        _inner(ours.trainer).state[ours.trainer.model.model.embed_tokens.weight]["state1"].dtype
        == torch.uint8
    )


# --- 2. the embedding override, without bitsandbytes' process-wide manager -------------------------------


def _one_step(trainer) -> torch.optim.Optimizer:
    opt = trainer.create_optimizer()
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return opt


def _trainer(optim, tmp_path, *, model=None, **kw):
    args = training_arguments(tmp_path, optim=optim, **kw)
    return OptiTrainer(model=model or _model(), args=args, train_dataset=SyntheticLMDataset(n=8))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_8bit_optimizer_skips_embeddings(tmp_path, fresh_bnb_manager, tied):
    """transformers' test_bnb_8bit_optimizer_skip_embedding, on the states themselves."""
    trainer = _trainer("adamw_bnb_8bit", tmp_path, model=_model(tie_word_embeddings=tied))
    model, opt = trainer.model, _one_step(trainer)
    dtypes = _state_dtypes(opt, model)
    assert dtypes["model.embed_tokens.weight"] == ("torch.float32", "torch.float32")
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == ("torch.uint8", "torch.uint8")
    # a tied head is the embedding's weight (32-bit); an untied one is an ordinary 8-bit linear
    assert ("lm_head.weight" in dtypes) != tied
    if not tied:
        assert dtypes["lm_head.weight"] == ("torch.uint8", "torch.uint8")
    # nothing was registered in bitsandbytes' process-wide manager
    assert (fresh_bnb_manager.module_weight_config_triple, fresh_bnb_manager.index2config) == ([], {})
    assert fresh_bnb_manager.pid2config == {}

    off = _one_step(_trainer("adamw_bnb_8bit", tmp_path, optim_args="embeddings_32bit=False"))
    assert next(iter(off.state.values()))["state1"].dtype == torch.uint8  # embed_tokens comes first


def test_overrides_left_by_transformers_do_not_reach_ours(tmp_path, fresh_bnb_manager):
    """Two trainers in one process: transformers' 8-bit run leaves (group, index) overrides behind.

    bitsandbytes' shared index2config then turns any later optimizer's parameter at (0, 0) into 32-bit
    states (here: a plain bitsandbytes optimizer over one linear weight, as the layerwise mode builds them).
    Ours reads only its own table.
    """
    run_training("adamw_bnb_8bit", tmp_path / "tf", steps=1, model=_model(), **TF)
    assert fresh_bnb_manager.index2config  # what transformers left behind

    weight = _model().model.layers[0].mlp.up_proj.weight
    plain = bnb.optim.AdamW([weight], optim_bits=8)
    weight.grad = torch.full_like(weight, 1e-3)
    plain.step()
    assert plain.state[weight]["state1"].dtype == torch.float32  # the leak, in bitsandbytes itself

    lw = run_training("adamw_bnb_8bit_layerwise", tmp_path / "lw", steps=1, model=_model(), max_grad_norm=0.0)
    params = dict(lw.trainer.model.named_parameters())
    for name, inner in _inner(lw.trainer).inner.items():
        small = params[name].numel() < 4096  # bitsandbytes' min_8bit_size
        expected = torch.float32 if small or "embed_tokens" in name else torch.uint8
        assert next(iter(inner.state.values()))["state1"].dtype == expected, name


def test_user_overrides_through_bitsandbytes_are_honoured(tmp_path):
    """A user's GlobalOptimManager override (bitsandbytes' documented API) still applies to our optimizer."""
    model = _model()
    bnb.optim.GlobalOptimManager.get_instance().register_module_override(
        model.model.layers[0].mlp.up_proj, "weight", {"optim_bits": 32}
    )
    opt = _one_step(_trainer("adamw_bnb_8bit", tmp_path, model=model))
    dtypes = _state_dtypes(opt, model)
    assert dtypes["model.layers.0.mlp.up_proj.weight"][0] == "torch.float32"
    assert dtypes["model.layers.1.mlp.up_proj.weight"][0] == "torch.uint8"


# --- 3. layerwise == standard (8-bit states on the kit's tiny model: min_8bit_size=0) --------------------


@pytest.mark.parametrize("name", _sampled(NAMES, LAYERWISE_SAMPLE))
def test_layerwise_matches_standard(tmp_path, name):
    optim_args = "min_8bit_size=0" if "8bit" in name else ""
    if "ademamix" in name:
        optim_args = ", ".join(filter(None, [optim_args, "t_alpha=4, t_beta3=4"]))
    case = ConformanceCase(
        f"{name}_layerwise", {"optim_args": optim_args, "learning_rate": LR[_family(name)]}
    )
    check_layerwise_matches_standard(case, tmp_path)


def test_layerwise_keeps_8bit_states_per_parameter(tmp_path):
    lw = run_training("lion_8bit_layerwise", tmp_path, steps=1, model=_model(), max_grad_norm=0.0)
    states = {n: next(iter(o.state.values())) for n, o in _inner(lw.trainer).inner.items()}
    up = states["model.layers.0.mlp.up_proj.weight"]
    assert up["state1"].dtype == torch.uint8 and up["absmax1"].numel() == 64 * 128 // 256
    assert states["model.embed_tokens.weight"]["state1"].dtype == torch.float32


# --- 4. exact resume, weights_only checkpoints -----------------------------------------------------------


@pytest.mark.parametrize("name", _sampled([*NAMES, "adamw_bnb_8bit_layerwise"], RESUME_SAMPLE))
def test_resume_equals_uninterrupted(tmp_path, name):
    kw = {"optim_args": "min_8bit_size=0"} if "8bit" in name else {}
    if name.endswith("_layerwise"):
        kw["max_grad_norm"] = 0.0
    check_resume(ConformanceCase(name, kw), tmp_path, steps=2)  # loads optimizer.pt with weights_only=True
    state = torch.load(tmp_path / "half" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    dtypes = set()

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            dtypes.add(obj.dtype)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)

    walk(state)
    assert (torch.uint8 in dtypes) == ("8bit" in name), dtypes


# --- 5. options and refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_unknown_key_names_the_accepted_ones(tmp_path, name):
    with pytest.raises(InvalidOptimArgsError) as err:
        training_arguments(tmp_path, optim=name, optim_args="rnak=16")
    assert "'rnak'" in str(err.value)
    for opt in optitrainer.get_optimizer(name).spec.options:
        assert f"{opt.name}=" in str(err.value)


@pytest.mark.parametrize(
    "name,optim_args,key",
    [
        ("ademamix", "t_alpha=0", "t_alpha"),
        ("ademamix_8bit", "beta1=1.5", "beta1"),
        ("ademamix", "alpha=-1", "alpha"),
        ("rmsprop_bnb", "momentum=maybe", "momentum"),
        ("adamw_bnb_8bit", "min_8bit_size=-1", "min_8bit_size"),
        ("lion_8bit", "embeddings_32bit=perhaps", "embeddings_32bit"),
        ("ademamix", "beta3=1.0", "beta3"),
        ("rmsprop_bnb", "alpha=1.0", "alpha"),
        ("rmsprop_bnb", "alpha=0", "alpha"),
        ("rmsprop_bnb_8bit", "momentum=1", "momentum"),
    ],
)
def test_bad_values_are_refused(tmp_path, name, optim_args, key):
    with pytest.raises(InvalidOptimArgsError, match=key):
        training_arguments(tmp_path, optim=name, optim_args=optim_args)


@pytest.mark.parametrize(
    "name,kw,fix",
    [
        ("adamw_bnb_8bit", {"adam_beta2": 1.0}, "set adam_beta2 inside"),
        ("lion_32bit", {"adam_beta1": -0.1}, "set adam_beta1 inside"),
        ("ademamix", {"adam_beta2": 1.0}, "optim_args='beta2=0.9'"),
        ("ademamix", {"optim_args": "beta1=0, t_beta3=100"}, "drop t_beta3"),
        ("adamw_bnb_8bit", {"adam_epsilon": -1.0}, "set adam_epsilon >= 0"),
    ],
)
def test_invalid_settings_are_refused_with_the_arguments(tmp_path, name, kw, fix):
    with pytest.raises(IncompatibleConfigError, match=fix):
        training_arguments(tmp_path, optim=name, **kw)


def test_settings_given_in_optim_args_are_not_refused_for_the_arguments(tmp_path):
    """AdEMAMix reads adam_beta2 only when optim_args has no beta2."""
    args = training_arguments(tmp_path, optim="ademamix", adam_beta2=1.0, optim_args="beta2=0.99")
    opt = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8)).create_optimizer()
    assert opt.param_groups[0]["betas"] == (0.9, 0.99, 0.9999)


@pytest.mark.parametrize("name", [*NAMES, *(f"{n}_layerwise" for n in NAMES)])
def test_kit_refusals(name):
    """The kit's check: ZeRO/FSDP refused naming the fix, DDP accepted, validators quiet on defaults."""
    check_refusals(ConformanceCase(name))


def test_options_reach_the_optimizer_typed(tmp_path):
    opt = _trainer("rmsprop_bnb_32bit", tmp_path, optim_args="alpha=0.9, momentum=0.5").create_optimizer()
    assert opt.param_groups[0]["betas"] == (0.9, 0.5) and opt.args.optim_bits == 32
    opt = _trainer("paged_lion_8bit", tmp_path, optim_args="min_8bit_size=100").create_optimizer()
    assert (opt.args.optim_bits, opt.args.min_8bit_size, opt.is_paged) == (8, 100, True)
    opt = _trainer("ademamix", tmp_path, adam_beta1=0.8, adam_epsilon=1e-7).create_optimizer()
    g = opt.param_groups[0]
    assert (g["betas"], g["eps"], g["alpha"], g["t_alpha"]) == ((0.8, 0.999, 0.9999), 1e-7, 5.0, None)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]


def test_plain_training_arguments_reach_the_plugin(tmp_path):
    """transformers' own TrainingArguments (optim is its enum) with an alias: built here, typed options too."""
    args = training_arguments(
        tmp_path,
        arguments_cls=transformers.TrainingArguments,
        optim="adamw_8bit",
        optim_args="min_8bit_size=0",
    )
    opt = OptiTrainer(model=_model(), args=args, train_dataset=SyntheticLMDataset(n=8)).create_optimizer()
    assert type(opt).__module__ == "optitrainer_bitsandbytes._optim"
    assert (opt.args.optim_bits, opt.args.min_8bit_size) == (8, 0)


# --- 6. packaging -----------------------------------------------------------------------------------------


def test_every_transformers_bitsandbytes_name_is_ours():
    from transformers.trainer_optimizer import _BITSANDBYTES_OPTIMIZERS

    theirs = {n.value for n in _BITSANDBYTES_OPTIMIZERS}
    assert theirs == set(NAMES) | set(ALIASES)
    for name in theirs:
        resolved = optitrainer.get_optimizer(name)
        assert resolved.provenance.distribution == "optitrainer-bitsandbytes"
        assert (
            resolved.spec.name == ALIASES.get(name, name)
            and resolved.spec.transformers_name == resolved.spec.name
        )


def test_entry_points_name_every_spec():
    import optitrainer_bitsandbytes as plugin

    dist = importlib.metadata.distribution("optitrainer-bitsandbytes")
    eps = {ep.name: ep.value for ep in dist.entry_points if ep.group == "optitrainer.optimizers"}
    assert sorted(eps) == sorted(NAMES) == sorted(s.name for s in plugin.SPECS)
    for name, target in eps.items():
        assert getattr(plugin, target.split(":")[1]).name == name
    assert dist.requires == ["optitrainer>=0.1", "bitsandbytes==0.50.2"]


def test_spec_module_imports_neither_torch_nor_bitsandbytes():
    import optitrainer_bitsandbytes

    tree = ast.parse(Path(optitrainer_bitsandbytes.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top <= {"__future__", "optitrainer"}, top


def test_paged_runs_on_cpu_as_the_unpaged_form(tmp_path):
    """bitsandbytes pages only CUDA tensors; on CPU it warns and trains with ordinary buffers."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paged = run_training("paged_adamw_8bit", tmp_path / "p", steps=3, model=_model())
    assert any("Paged optimizers are not supported on CPU" in str(w.message) for w in caught)
    plain = run_training("adamw_bnb_8bit", tmp_path / "a", steps=3, model=_model())
    assert_same_run(paged, plain)


# --- 7. DDP (2 CPU ranks through torchrun; OPTITRAINER_BNB_FULL=1) ------------------------------------------


def _torchrun(script: Path, *args, timeout: float = 900) -> None:
    """torchrun --standalone, 2 ranks, in its own process group: killed whole if it outlives ``timeout``."""
    import shutil
    import signal
    import subprocess
    import sys

    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [exe, "--standalone", "--nproc_per_node", "2", str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-6000:]


@pytest.mark.skipif(not FULL, reason="2-process torchrun; OPTITRAINER_BNB_FULL=1 runs it")
def test_ddp_two_ranks_match_one_process_and_resume_exactly(tmp_path):
    import json

    ddp = {"ddp_backend": "gloo", "per_device_train_batch_size": 2, "warmup_steps": 1}
    ddp["optim_args"] = "min_8bit_size=0"  # 8-bit states on every weight of the kit's tiny model
    runs = [
        {"name": "std", "optim": "adamw_bnb_8bit", "args": ddp},
        {"name": "lw", "optim": "adamw_bnb_8bit_layerwise", "args": {**ddp, "max_grad_norm": 0.0}},
    ]
    runs += [{**r, "name": r["name"] + "_resumed", "resume_at": 2} for r in runs]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    _torchrun(Path(__file__).with_name("ddp_train.py"), tmp_path, tmp_path / "runs.json")

    def load(name):
        return [torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=True) for r in (0, 1)]

    for run in runs[:2]:
        (r0, r1), (res0, _) = load(run["name"]), load(run["name"] + "_resumed")
        assert r0["engine"] == "DDP"
        assert max_param_diff(r0["params"], r1["params"]) == 0.0  # ranks identical
        assert max_param_diff(res0["params"], r0["params"]) == 0.0  # resume exact under DDP
        # one process with the same global batch: equal up to the float reordering of the average
        single = {k: v for k, v in run["args"].items() if k != "ddp_backend"}
        single["per_device_train_batch_size"] = 4
        ref = run_training(run["optim"], tmp_path / f"one-{run['name']}", steps=4, **single)
        diff = max_param_diff(r0["params"], ref.params)
        print(f"{run['optim']}: max |dparam| DDP(2) vs one process = {diff:.3g}")
        assert diff <= 1e-4
        assert max(abs(a - b) for a, b in zip(r0["losses"], ref.losses)) <= 1e-4
