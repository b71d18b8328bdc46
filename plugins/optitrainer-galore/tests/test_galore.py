"""optitrainer-galore: the specification of galore_adamw, galore_adamw_8bit and galore_adafactor.

Every run is a tiny Llama on CPU in float32; GaLore runs use rank=4 and update_proj_gap=5 (so the
projection is refreshed during the run) unless a test is about the defaults.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import runpy
import sys
from pathlib import Path

import pytest
import torch
import transformers

import optitrainer
from optitrainer import IncompatibleConfigError, InvalidOptimArgsError, OptiTrainer
from optitrainer.plugin import BuildContext
from optitrainer.testing import (
    SyntheticLMDataset,
    assert_learns,
    assert_same_run,
    max_param_diff,
    run_training,
    step_temporaries_bytes,
    tiny_llama,
    training_arguments,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PLUGIN = Path(__file__).resolve().parents[1]
REPO = PLUGIN.parents[1]
GUIDE_TARGETS = [r".*.attn.*", r".*.mlp.*"]
SMALL = "rank=4, update_proj_gap=5"
#: settings on which transformers and optitrainer must agree: transformers hands GaLore the learning
#: rate only, so weight decay stays at upstream's default 0 and betas/eps at GaLoreAdamW's defaults
AGREE = {"weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-6}
HF = {"trainer_cls": transformers.Trainer, "arguments_cls": transformers.TrainingArguments}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny SVDs and matmuls: one thread is much faster (and not slowed down by a busy machine)."""
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)


def galore_args(**overrides):
    kwargs = {"optim_target_modules": GUIDE_TARGETS, "optim_args": SMALL}
    kwargs.update(overrides)
    return kwargs


def build_optimizer(optim: str, **overrides):
    """The optimizer OptiTrainer builds for the tiny Llama (no training)."""
    args = training_arguments("unused", optim=optim, **galore_args(**overrides))
    trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8))
    return trainer, trainer.create_optimizer()


def linear_weight_names(model, *, kinds=("self_attn", "mlp")) -> list[str]:
    return [
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(k in n for k in kinds)
    ]


# --- registration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adafactor_layerwise"]
)
def test_names_resolve_to_this_distribution(name):
    resolved = optitrainer.get_optimizer(name)
    assert resolved.provenance.distribution == "optitrainer-galore"
    assert resolved.layerwise == name.endswith("_layerwise")
    caps = resolved.spec.capabilities
    assert caps.layerwise and caps.needs_target_modules
    assert caps.requires_cuda == ("8bit" in name)
    opts = resolved.spec.option_map
    # transformers' defaults
    assert (opts["rank"].default, opts["update_proj_gap"].default) == (128, 200)
    assert (opts["scale"].default, opts["proj_type"].default) == (0.25, "std")
    assert opts["proj_type"].choices == ("std", "reverse_std", "right", "left", "full")


def test_spec_module_imports_no_upstream_package():
    """``optitrainer list`` imports the spec module: it must not import torch, galore-torch or bitsandbytes."""
    tree = ast.parse((PLUGIN / "optitrainer_galore" / "__init__.py").read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"torch", "galore_torch", "bitsandbytes", "transformers"}, top_level


# --- target modules and parameter groups --------------------------------------------------------


def test_guide_patterns_select_every_attention_and_mlp_linear_of_a_llama(recwarn):
    trainer, opt = build_optimizer("galore_adamw")
    model = trainer.model
    names = {id(p): n for n, p in model.named_parameters()}
    expected = linear_weight_names(model)
    assert len(expected) == 2 * (4 + 3)  # q,k,v,o + gate,up,down in each of the 2 layers
    # groups: plain+decay, plain+no-decay, projected+decay, projected+no-decay (transformers: plain, projected)
    assert len(opt.param_groups) == 4
    plain_decay, plain_nodecay, projected, projected_nodecay = opt.param_groups
    assert [names[id(p)] for p in projected["params"]] == expected
    assert projected_nodecay["params"] == []
    assert sorted(names[id(p)] for p in plain_decay["params"]) == [
        "lm_head.weight",
        "model.embed_tokens.weight",
    ]
    assert all("norm" in names[id(p)] for p in plain_nodecay["params"])
    for g in (projected, projected_nodecay):
        assert (g["rank"], g["update_proj_gap"], g["scale"], g["proj_type"]) == (4, 5, 0.25, "std")
    assert not any("rank" in g for g in (plain_decay, plain_nodecay))
    assert not [w for w in recwarn if "nn.Linear" in str(w.message)]  # the guide's regexes warn about nothing


def test_transformers_selects_the_same_weights_in_the_same_order():
    model = tiny_llama()
    args = transformers.TrainingArguments(
        "unused", optim="galore_adamw", optim_target_modules=GUIDE_TARGETS, use_cpu=True, report_to="none"
    )
    _, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    hf_plain, hf_projected = kwargs["params"]
    hf_names = {id(p): n for n, p in model.named_parameters()}
    trainer, opt = build_optimizer("galore_adamw")
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert [hf_names[id(p)] for p in hf_projected["params"]] == [
        names[id(p)] for p in opt.param_groups[2]["params"]
    ]
    # the plain parameters are split by weight decay here (transformers: one group, no weight decay)
    assert sorted(hf_names[id(p)] for p in hf_plain["params"]) == sorted(
        names[id(p)] for g in opt.param_groups[:2] for p in g["params"]
    )
    assert hf_projected["rank"] == 128 and "weight_decay" not in hf_projected  # lr only: see the README


def test_layerwise_factory_gets_one_group_per_parameter():
    trainer, opt = build_optimizer("galore_adamw_layerwise")
    inner = opt.inner
    projected = set(linear_weight_names(trainer.model))
    assert set(inner) == {n for n, _ in trainer.model.named_parameters()}
    for name, sub in inner.items():
        assert len(sub.param_groups) == 1, name
        group = sub.param_groups[0]
        assert ("rank" in group) == (name in projected), name
        assert group["weight_decay"] == (0.0 if "norm" in name else trainer.args.weight_decay)


# --- parity with transformers.Trainer -----------------------------------------------------------


@pytest.mark.parametrize(
    "name, optim_args",
    [
        ("galore_adamw", SMALL),
        ("galore_adamw", None),  # transformers' defaults: rank=128, update_proj_gap=200, scale=0.25, std
        ("galore_adafactor", SMALL + ", proj_type=reverse_std"),
    ],
)
def test_parity_with_transformers(tmp_path, name, optim_args):
    kw = galore_args(optim_args=optim_args, **AGREE)
    ref = run_training(name, tmp_path / "ref", steps=20, **HF, **kw)
    opti = run_training(name, tmp_path / "opti", steps=20, **kw)
    assert_same_run(ref, opti)
    assert max_param_diff(ref.params, tiny_llama().state_dict()) > 0  # it trained


def test_galore_adafactor_uses_the_trainers_learning_rate_like_transformers():
    _, opt = build_optimizer("galore_adafactor", weight_decay=0.05)
    for g in opt.param_groups:
        assert g["relative_step"] is False and g["scale_parameter"] is False and g["warmup_init"] is False
        assert g["lr"] == 1e-3
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0, 0.05, 0.0]
    model = tiny_llama()
    args = transformers.TrainingArguments(
        "unused", optim="galore_adafactor", optim_target_modules=GUIDE_TARGETS, use_cpu=True, report_to="none"
    )
    _, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    assert kwargs["relative_step"] is False and kwargs["scale_parameter"] is False


def test_weight_decay_betas_and_eps_are_honoured_unlike_transformers(tmp_path):
    """transformers passes GaLore the learning rate only: weight_decay, adam_beta1/2, adam_epsilon are lost."""
    user = {"weight_decay": 0.1, "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_epsilon": 1e-8}
    _, opt = build_optimizer("galore_adamw", **user)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1, 0.0]
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.99) and g["eps"] == 1e-8

    kw = galore_args(learning_rate=1e-2)
    hf = run_training("galore_adamw", tmp_path / "hf", steps=20, **HF, **kw, **user)
    opti = run_training("galore_adamw", tmp_path / "opti", steps=20, **kw, **user)
    assert max_param_diff(hf.params, opti.params) > 1e-4
    # transformers' run is the one with upstream's defaults: it ignored the user's settings
    defaults = run_training("galore_adamw", tmp_path / "defaults", steps=20, **kw, **AGREE)
    assert_same_run(hf, defaults)


# --- layerwise -----------------------------------------------------------------------------------


def test_layerwise_equals_standard_without_clipping(tmp_path):
    kw = galore_args(max_grad_norm=0.0, lr_scheduler_type="linear")
    standard = run_training("galore_adamw", tmp_path / "std", steps=20, **kw)
    layerwise = run_training("galore_adamw_layerwise", tmp_path / "lw", steps=20, **kw)
    assert_same_run(standard, layerwise)
    assert layerwise.learning_rates[0] > layerwise.learning_rates[-1]  # the schedule reached the updates


def test_galore_adafactor_layerwise_trains_where_transformers_fails(tmp_path):
    kw = galore_args(max_grad_norm=0.0, learning_rate=1e-2)
    # transformers builds the per-parameter Adafactors with the lr and relative_step=True: refused
    with pytest.raises(ValueError, match="relative_step=True"):
        run_training("galore_adafactor_layerwise", tmp_path / "hf", steps=20, **HF, **kw)
    result = run_training("galore_adafactor_layerwise", tmp_path / "opti", steps=20, **kw)
    assert_learns(result, min_drop=0.02)


# --- 8-bit: CUDA only ------------------------------------------------------------------------------


@NO_CUDA
@pytest.mark.parametrize("name", ["galore_adamw_8bit", "galore_adamw_8bit_layerwise"])
def test_8bit_is_refused_without_cuda_before_training(tmp_path, name):
    with pytest.raises(IncompatibleConfigError, match="needs a CUDA device"):
        training_arguments(tmp_path, optim=name, **galore_args())
    # with transformers' own arguments, OptiTrainer refuses at construction
    args = training_arguments(
        tmp_path, optim=name, arguments_cls=transformers.TrainingArguments, **galore_args()
    )
    with pytest.raises(IncompatibleConfigError, match="needs a CUDA device"):
        OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8))


@NO_CUDA
def test_transformers_8bit_without_cuda_fails_only_inside_the_first_step(tmp_path):
    args = training_arguments(
        tmp_path, optim="galore_adamw_8bit", arguments_cls=transformers.TrainingArguments, **galore_args()
    )
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=SyntheticLMDataset(n=8))  # accepted
    # a forward, a backward and part of the update run; then upstream's torch.cuda.synchronize() fails
    with pytest.raises((AssertionError, RuntimeError), match="CUDA|no NVIDIA driver"):  # CPU or CUDA torch
        trainer.train()
    touched = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert touched  # the weights were already modified when it failed


# --- the subclasses against upstream ------------------------------------------------------------


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.nn.Parameter(torch.randn(12, 8, generator=g))  # tall
    w2 = torch.nn.Parameter(torch.randn(6, 10, generator=g))  # wide
    b = torch.nn.Parameter(torch.randn(8, generator=g))
    return [w1, w2, b]


def _groups(params, proj_type):
    w1, w2, b = params
    galore = {"rank": 3, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_type}
    return [{"params": [b], "weight_decay": 0.0}, {"params": [w1, w2], "weight_decay": 0.1, **galore}]


def _grads(step, params):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _upstream_and_ours(kind):
    import galore_torch
    from optitrainer_galore import optimizers as ours

    if kind == "adamw":
        kw = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-7}
        return (
            lambda gr: galore_torch.GaLoreAdamW(gr, no_deprecation_warning=True, **kw),
            lambda gr: ours.GaLoreAdamW(gr, **kw),
        )
    if kind.startswith("adafactor"):
        kw = {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9}
        if kind == "adafactor_plain":  # no first moment, weight decay, parameter scaling
            kw = {"lr": 1e-2, "relative_step": False, "scale_parameter": True, "weight_decay": 0.1}
        scratch = {"gradient_is_scratch": kind == "adafactor_scratch"}  # what the layerwise form builds
        return (
            lambda gr: galore_torch.GaLoreAdafactor(gr, **kw),
            lambda gr: ours.GaLoreAdafactor(gr, **kw, **scratch),
        )
    if kind == "adamw_scratch":
        kw = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.1}
        return (
            lambda gr: galore_torch.GaLoreAdamW(gr, no_deprecation_warning=True, **kw),
            lambda gr: ours.GaLoreAdamW(gr, gradient_is_scratch=True, **kw),
        )
    kw = {"lr": 1e-2, "min_8bit_size": 16}  # small enough that the projected states are 8-bit
    return lambda gr: galore_torch.GaLoreAdamW8bit(gr, **kw), lambda gr: ours.GaLoreAdamW8bit(gr, **kw)


def _step(opt, params, step):
    for p, g in zip(params, _grads(step, params)):
        p.grad = g
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize(
    "kind, proj_type",
    [
        ("adamw", "std"),
        ("adamw", "reverse_std"),
        ("adamw", "right"),
        ("adamw", "left"),
        ("adamw", "full"),
        ("adafactor", "std"),
        ("adafactor", "full"),
        ("adafactor_plain", "std"),
        ("adafactor_scratch", "std"),
        ("adafactor_scratch", "left"),
        ("adamw_scratch", "std"),
        ("adamw8bit", "std"),
    ],
)
def test_subclass_equals_upstream_and_resumes_from_a_weights_only_checkpoint(monkeypatch, kind, proj_type):
    """12 steps (projection refreshed at steps 0, 5, 10): upstream uninterrupted == ours with a
    save/load at step 7 into a fresh optimizer and fresh parameters. Upstream's own checkpoint does not
    load with weights_only=True."""
    if kind == "adamw8bit":
        if not torch.cuda.is_available():
            monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # bitsandbytes runs on CPU
    make_upstream, make_ours = _upstream_and_ours(kind)
    up_params, our_params = _params(), _params()
    upstream, ours = make_upstream(_groups(up_params, proj_type)), make_ours(_groups(our_params, proj_type))
    for step in range(7):
        _step(upstream, up_params, step)
        _step(ours, our_params, step)
    for a, b in zip(up_params, our_params):
        assert torch.equal(a, b)

    buf = io.BytesIO()
    torch.save(upstream.state_dict(), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="GaLoreProjector"):
        torch.load(buf, weights_only=True)

    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert all("projector" not in s for s in saved["state"].values())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in our_params]
    resumed = make_ours(_groups(resumed_params, proj_type))
    resumed.load_state_dict(saved)
    assert "projector" in ours.state[our_params[0]]  # the live state is upstream's: untouched by state_dict()
    for step in range(7, 12):
        _step(upstream, up_params, step)
        _step(resumed, resumed_params, step)
    for a, b in zip(up_params, resumed_params):
        assert torch.equal(a, b)


# --- resume through the trainer -----------------------------------------------------------------

N = 6  # resume at step 6: the projection in use was computed at step 5 (update_proj_gap=5), not refreshed


def _count_key(obj, key) -> int:
    if isinstance(obj, dict):
        return sum((k == key) + _count_key(v, key) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_count_key(v, key) for v in obj)
    return 0


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor", "galore_adamw_layerwise"])
def test_resume_is_exact(tmp_path, name):
    from optitrainer_galore.optimizers import ORTHO_KEY

    kw = galore_args(save_strategy="steps", save_steps=N, **{**AGREE, "weight_decay": 0.01})
    if name.endswith("_layerwise"):
        kw["max_grad_norm"] = 0.0
    straight = run_training(name, tmp_path, steps=2 * N, **kw)
    checkpoint = tmp_path / f"checkpoint-{N}"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert _count_key(state, ORTHO_KEY) == 2 * 7  # one projection matrix per projected weight
    resumed = run_training(
        name, tmp_path / "resumed", steps=2 * N, resume_from_checkpoint=str(checkpoint), **kw
    )
    # the log history of the first N steps comes from the checkpoint; the last N are new
    assert len(resumed.losses) == 2 * N
    assert resumed.losses[N:] == straight.losses[N:]
    assert max_param_diff(straight.params, resumed.params) == 0.0


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor"])
def test_transformers_resume_crashes(tmp_path, name):
    kw = galore_args(save_strategy="steps", save_steps=2, **AGREE)
    run_training(name, tmp_path, steps=2, **HF, **kw)
    with pytest.raises(pickle.UnpicklingError, match="GaLoreProjector"):
        run_training(
            name, tmp_path, steps=4, resume_from_checkpoint=str(tmp_path / "checkpoint-2"), **HF, **kw
        )


# --- bad input, refused before the first step -----------------------------------------------------


def test_missing_target_modules_is_refused_with_the_fix(tmp_path):
    with pytest.raises(IncompatibleConfigError, match=r"set optim_target_modules.*all-linear"):
        training_arguments(tmp_path, optim="galore_adamw_layerwise")


def test_patterns_matching_no_linear_are_refused_with_the_models_linear_names(tmp_path):
    args = training_arguments(tmp_path, optim="galore_adamw", optim_target_modules=[r".*\.attention\..*"])
    with pytest.raises(IncompatibleConfigError) as err:
        OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8))
    msg = str(err.value)
    assert "selects no nn.Linear layer of LlamaForCausalLM" in msg and "attention" in msg
    assert "'model.layers.0.self_attn.q_proj'" in msg and "'model.layers.0.self_attn.k_proj'" in msg
    assert "all-linear" in msg


def test_matched_modules_that_are_not_linear_are_named_in_a_warning(tmp_path):
    args = training_arguments(
        tmp_path, optim="galore_adamw", optim_target_modules=[r".*.attn.*", "embed_tokens", "input_layernorm"]
    )
    with pytest.warns(UserWarning, match=r"not nn.Linear: model\.embed_tokens \(Embedding\)") as record:
        trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8))
    assert "model.layers.1.input_layernorm (LlamaRMSNorm)" in str(record[0].message)
    opt = trainer.create_optimizer()
    projected = {id(p) for g in opt.param_groups if "rank" in g for p in g["params"]}
    assert id(trainer.model.model.embed_tokens.weight) not in projected  # optimized normally
    assert len(projected) == 2 * 4


def test_optim_args_are_typed_and_checked(tmp_path):
    with pytest.raises(InvalidOptimArgsError, match="rank"):
        training_arguments(
            tmp_path, optim="galore_adamw", optim_target_modules="all-linear", optim_args="rnk=4"
        )
    with pytest.raises(InvalidOptimArgsError, match="proj_type"):
        training_arguments(
            tmp_path, optim="galore_adamw", optim_target_modules="all-linear", optim_args="proj_type=up"
        )
    args = training_arguments(
        tmp_path,
        optim="galore_adafactor",
        optim_target_modules="all-linear",
        optim_args="rank=8, scale=0.1, beta1=0.9",
    )
    assert args.optimizer_choice.options["rank"] == 8 and args.optimizer_choice.options["beta1"] == 0.9


def test_all_linear_includes_the_head_like_transformers():
    _, opt = build_optimizer("galore_adamw", optim_target_modules="all-linear")
    assert len(opt.param_groups[2]["params"]) == 2 * 7 + 1  # lm_head is an nn.Linear


# --- the guide's examples ----------------------------------------------------------------------------


def test_guide_examples_run(capsys, monkeypatch):
    for extra in ("trl", "datasets"):  # the guide's SFTTrainer example (test extras, not in the floor run)
        pytest.importorskip(extra)
    monkeypatch.setattr(sys, "argv", ["galore.py"])
    runpy.run_path(str(REPO / "examples" / "guide" / "galore.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "galore_adamw: GaLoreAdamW" in out
    assert "galore_adamw_layerwise: LayerwiseOptimizer" in out
    assert out.count("final loss") == 2


def test_build_context_is_public_api_only():
    """The factories need nothing but the public BuildContext (a third party could write this plugin)."""
    from optitrainer_galore import galore_param_groups

    model = tiny_llama()
    args = training_arguments("unused", optim="galore_adamw", optim_target_modules=GUIDE_TARGETS)
    ctx = BuildContext(model=model, args=args, options={}, name="galore_adamw")
    groups = galore_param_groups(ctx, {"rank": 2})
    assert [len(g["params"]) for g in groups] == [2, 5, 14, 0]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "right", "left", "full"])
def test_state_and_checkpoint_keep_only_the_rank_r_factor(proj_type):
    """Upstream keeps a view of the whole SVD factor (min(m, n) columns or rows) alive per weight."""
    import galore_torch
    from optitrainer_galore import optimizers as ours

    def ortho_bytes(opt, params):
        mats = []
        for p in params:
            o = opt.state[p]["projector"].ortho_matrix
            mats += o if isinstance(o, list) else [o]
        return sum(m.untyped_storage().nbytes() for m in mats), sum(
            m.numel() * m.element_size() for m in mats
        )

    up_params, our_params = _params(), _params()
    upstream = galore_torch.GaLoreAdamW(_groups(up_params, proj_type), lr=1e-2, no_deprecation_warning=True)
    lean = ours.GaLoreAdamW(_groups(our_params, proj_type), lr=1e-2)
    for step in range(2):
        _step(upstream, up_params, step)
        _step(lean, our_params, step)
    projected = [p for p in our_params if "projector" in lean.state[p]]
    held, needed = ortho_bytes(lean, projected)
    assert held == needed
    up_projected = [p for p in up_params if "projector" in upstream.state[p]]
    up_held, up_needed = ortho_bytes(upstream, up_projected)
    assert up_needed == needed and up_held > needed  # what the fix saves
    # a checkpoint saves a tensor's whole storage: upstream's holds the whole factors too
    saved, up_saved = io.BytesIO(), io.BytesIO()
    torch.save([lean.state[p]["projector"].ortho_matrix for p in projected], saved)
    torch.save([upstream.state[p]["projector"].ortho_matrix for p in up_projected], up_saved)
    assert saved.getbuffer().nbytes < up_saved.getbuffer().nbytes


def test_reverse_std_with_a_square_low_rank_gradient_trains_where_upstream_crashes():
    """A wide weight with rank == its rows: the low-rank gradient is square and upstream's project_back
    picks the wrong side (a shape error); ours uses the side project() used."""
    import galore_torch
    from optitrainer_galore import optimizers as ours

    def make(cls, **kw):
        g = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 10, generator=g))
        group = {"params": [w], "rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": "reverse_std"}
        return w, cls([group], lr=1e-2, **kw)

    w_up, upstream = make(galore_torch.GaLoreAdamW, no_deprecation_warning=True)
    w_up.grad = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied|size mismatch|must match"):
        upstream.step()
    w, lean = make(ours.GaLoreAdamW)
    before = w.detach().clone()
    w.grad = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    lean.step()
    assert torch.isfinite(w).all() and not torch.equal(w, before)


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_layerwise_update_of_a_projected_weight_needs_no_weight_sized_temporary(kind):
    from optitrainer_galore.optimizers import GaLoreAdafactor, GaLoreAdamW

    torch.manual_seed(0)
    weight, grads = torch.randn(512, 128), [torch.randn(512, 128) for _ in range(3)]
    result, temporaries = {}, {}
    for scratch in (False, True):  # True: what the layerwise engine builds (it frees the gradient after)
        p = torch.nn.Parameter(weight.clone())
        group = {"params": [p], "rank": 8, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
        if kind == "adamw":
            opt = GaLoreAdamW([group], lr=1e-2, weight_decay=0.1, gradient_is_scratch=scratch)
        else:
            opt = GaLoreAdafactor([group], lr=1e-2, relative_step=False, gradient_is_scratch=scratch)
        for g in grads:  # the first step computes the SVD; the others are the steady state
            p.grad = g.clone()
            temporaries[scratch] = step_temporaries_bytes(opt)
        result[scratch] = p.detach().clone()
    weight_bytes = weight.numel() * weight.element_size()
    assert temporaries[False] >= weight_bytes  # the full-size update, allocated
    assert temporaries[True] <= weight_bytes // 4  # only the rank-8 moments' temporaries
    assert torch.equal(result[True], result[False])  # written over the gradient: the same numbers
