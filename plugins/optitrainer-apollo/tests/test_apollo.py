"""optitrainer-apollo: the specification of apollo_adamw, apollo_mini and their layerwise forms.

Runs are tiny Llamas on CPU in float32; "identical" means bit-for-bit equal losses and parameters.
"""

from __future__ import annotations

import io
import pickle
import runpy
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import transformers
from apollo_torch import APOLLOAdamW as UpstreamAPOLLOAdamW
from optitrainer_apollo.optim import APOLLOAdamW

import optitrainer
from optitrainer import IncompatibleConfigError, OptiTrainer, OptiTrainingArguments
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

transformers.logging.set_verbosity_error()

GUIDE_TARGETS = [r".*.attn.*", r".*.mlp.*"]
GUIDE_MINI_ARGS = "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200"
HF = {"trainer_cls": transformers.Trainer, "arguments_cls": transformers.TrainingArguments}
#: apollo-torch's own eps: transformers gives adam_epsilon only to the projected group, the others keep 1e-6
UPSTREAM_EPS = 1e-6
#: settings where transformers and optitrainer agree (no weight decay, upstream's betas/eps); no
#: clipping and a short projection gap, so the comparisons also cover projection refreshes
AGREE = {"optim_target_modules": GUIDE_TARGETS, "adam_epsilon": UPSTREAM_EPS, "max_grad_norm": 0.0}
GAP5 = "update_proj_gap=5"
REPO = Path(__file__).resolve().parents[3]

_RUNS: dict[str, object] = {}


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """The tensors are tiny: extra intra-op threads only add synchronisation (5-10x slower on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    _RUNS.clear()


def cached_run(key: str, tmp_path_factory, optim: str, **kwargs):
    """Runs shared by several tests (each is a 20-step training)."""
    if key not in _RUNS:
        _RUNS[key] = run_training(optim, tmp_path_factory.mktemp(key), **kwargs)
    return _RUNS[key]


def hf_std(f):
    return cached_run("hf_std", f, "apollo_adamw", steps=20, optim_args=GAP5, **AGREE, **HF)


def opti_std(f):
    return cached_run("opti_std", f, "apollo_adamw", steps=20, optim_args=GAP5, **AGREE)


def inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's AcceleratedOptimizer


def projected(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups if "rank" in g for p in g["params"]]


def make_trainer(tmp_path, optim, *, hf=False, model=None, **kwargs):
    kwargs.setdefault("optim_target_modules", GUIDE_TARGETS)
    cls = transformers.TrainingArguments if hf else OptiTrainingArguments
    args = training_arguments(tmp_path, arguments_cls=cls, optim=optim, **kwargs)
    trainer_cls = transformers.Trainer if hf else OptiTrainer
    return trainer_cls(model=model or tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=16))


# --- 1. parity with transformers.Trainer --------------------------------------------------------------
def test_apollo_adamw_matches_transformers(tmp_path_factory):
    ref, ours = hf_std(tmp_path_factory), opti_std(tmp_path_factory)
    assert_same_run(ref, ours)
    assert_learns(ours, min_drop=0.01)


def test_guide_apollo_mini_args_on_transformers_match_apollo_mini_by_name(tmp_path):
    # the guide's APOLLO-Mini (optim_args on transformers' apollo_adamw) with its defaults otherwise
    # (max_grad_norm=1.0, gap 200); our apollo_mini needs no optim_args for the same numbers
    common = {"optim_target_modules": GUIDE_TARGETS, "adam_epsilon": UPSTREAM_EPS}
    ref = run_training("apollo_adamw", tmp_path / "ref", steps=20, optim_args=GUIDE_MINI_ARGS, **common, **HF)
    ours = run_training("apollo_mini", tmp_path / "opti", steps=20, **common)
    assert_same_run(ref, ours)
    opt = inner(ours.trainer.optimizer)
    group = next(g for g in opt.param_groups if "rank" in g)
    assert (group["rank"], group["scale_type"], group["scale"]) == (1, "tensor", 128.0)


def test_apollo_mini_preset_is_overridable(tmp_path):
    opt = make_trainer(tmp_path, "apollo_mini", optim_args="rank=2, scale=4").create_optimizer()
    groups = [g for g in opt.param_groups if "rank" in g]
    assert {(g["rank"], g["scale"], g["scale_type"], g["proj"]) for g in groups} == {
        (2, 4.0, "tensor", "random")
    }


# --- training arguments reach every group (transformers: only the projected one, and no decay) -------
HP = {"adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-7, "weight_decay": 0.1, "learning_rate": 0.01}


def check_every_group_follows_the_arguments(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        assert g["betas"] == (HP["adam_beta1"], HP["adam_beta2"]), g["betas"]
        assert g["eps"] == HP["adam_epsilon"], g["eps"]
    # the update reaches every parameter: with zero gradients only the decoupled decay moves them
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        is_norm = "norm" in n
        expected = before[n] if is_norm else before[n] * (1 - HP["learning_rate"] * HP["weight_decay"])
        assert torch.allclose(p, expected, rtol=1e-6, atol=0), f"{n} was not decayed as weight_decay asks"
    assert any(
        "norm" in names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]
    )


def test_betas_eps_and_weight_decay_reach_every_group(tmp_path):
    model = tiny_llama()
    opt = make_trainer(tmp_path / "o", "apollo_adamw", model=model, **HP).create_optimizer()
    check_every_group_follows_the_arguments(opt, model)


def test_transformers_drops_betas_eps_of_plain_group_and_all_weight_decay(tmp_path):
    model = tiny_llama()
    ref = make_trainer(tmp_path / "r", "apollo_adamw", hf=True, model=model, **HP).create_optimizer()
    plain = ref.param_groups[0]
    assert "rank" not in plain and (plain["betas"], plain["eps"]) == ((0.9, 0.999), UPSTREAM_EPS)
    assert {g["weight_decay"] for g in ref.param_groups} == {0.0}
    with pytest.raises(AssertionError):
        check_every_group_follows_the_arguments(ref, model)


# --- 2. layerwise computes what the one-optimizer form computes ----------------------------------------
def test_layerwise_trains_like_standard(tmp_path_factory):
    lw = cached_run("opti_lw", tmp_path_factory, "apollo_adamw_layerwise", steps=20, optim_args=GAP5, **AGREE)
    assert_same_run(opti_std(tmp_path_factory), lw)


def test_apollo_mini_layerwise_trains_like_apollo_mini(tmp_path):
    kw = {**AGREE, "optim_args": "update_proj_gap=3"}
    std = run_training("apollo_mini", tmp_path / "s", steps=10, **kw)
    assert_same_run(std, run_training("apollo_mini_layerwise", tmp_path / "l", steps=10, **kw))


def test_transformers_layerwise_does_not_train_like_its_standard_form(tmp_path_factory):
    lw = cached_run(
        "hf_lw", tmp_path_factory, "apollo_adamw_layerwise", steps=20, optim_args=GAP5, **AGREE, **HF
    )
    ref = hf_std(tmp_path_factory)
    assert lw.learning_rates == ref.learning_rates  # same schedule: the projections differ
    assert max(abs(a - b) for a, b in zip(lw.losses, ref.losses)) > 1e-3
    assert max_param_diff(lw.params, ref.params) > 1e-3


def test_projection_seeds_layerwise_equal_standard_and_transformers(tmp_path):
    model = tiny_llama()
    names = {id(p): n for n, p in model.named_parameters()}

    def seeds(opt):
        return {names[id(p)]: opt.state[p]["seed"] for p in projected(opt)}

    ours = seeds(make_trainer(tmp_path / "a", "apollo_adamw", model=model).create_optimizer())
    ours_lw_opt = make_trainer(tmp_path / "b", "apollo_adamw_layerwise", model=model).create_optimizer()
    ours_lw = {k: v for o in ours_lw_opt.inner.values() for k, v in seeds(o).items()}
    ref = seeds(make_trainer(tmp_path / "c", "apollo_adamw", hf=True, model=model).create_optimizer())
    # transformers' layerwise registers hooks on the model it is given: use another one
    model2 = tiny_llama()
    names.update({id(p): n for n, p in model2.named_parameters()})
    ref_lw_opt = make_trainer(
        tmp_path / "d", "apollo_adamw_layerwise", hf=True, model=model2
    ).create_optimizer()
    ref_lw = {k: v for o in ref_lw_opt.optimizer_dict.values() for k, v in seeds(o).items()}

    assert len(ours) == 14 and len(set(ours.values())) == 14
    assert ours == ours_lw == ref
    assert set(ref_lw.values()) == {1}  # every per-parameter optimizer of transformers draws seed 1


# --- 3. exact resume; the state is plain -----------------------------------------------------------------
@pytest.mark.parametrize("optim", ["apollo_adamw", "apollo_adamw_layerwise"])
def test_resume_is_exact(tmp_path, optim):
    # gap 3 with a checkpoint at step 4: the projection is refreshed before and after the resume, so
    # both the saved matrix and the saved seed of the next one matter
    kw = {"optim_target_modules": GUIDE_TARGETS, "optim_args": "update_proj_gap=3"}
    if optim.endswith("_layerwise"):
        kw["max_grad_norm"] = 0.0  # one backward per step (exact layerwise clipping needs two)
    straight = run_training(optim, tmp_path, steps=8, save_strategy="steps", save_steps=4, **kw)
    ckpt = tmp_path / "checkpoint-4"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    resumed = run_training(optim, tmp_path / "resumed", steps=8, resume_from_checkpoint=str(ckpt), **kw)
    assert_same_run(straight, resumed)
    per_param = list(state["layerwise"].values()) if "layerwise" in state else [state]
    projectors = [s["projector"] for sd in per_param for s in sd["state"].values() if "projector" in s]
    assert len(projectors) == 14
    assert all(isinstance(p["ortho_matrix"], torch.Tensor) and isinstance(p["seed"], int) for p in projectors)


def test_transformers_cannot_resume_apollo_adamw(tmp_path):
    run_training("apollo_adamw", tmp_path, steps=2, save_strategy="steps", save_steps=1, **AGREE, **HF)
    with pytest.raises(pickle.UnpicklingError, match="GradientProjector"):
        run_training(
            "apollo_adamw",
            tmp_path,
            steps=2,
            resume_from_checkpoint=str(tmp_path / "checkpoint-1"),
            **AGREE,
            **HF,
        )


def _params_and_grads(steps: int):
    g = torch.Generator().manual_seed(0)
    shapes = [(24, 8), (8, 24), (16, 16), (16,)]  # tall, wide, square, and a vector (never projected)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(steps)]
    return params, grads


def _groups(params, **apollo):
    return [
        {"params": params[3:]},
        {"params": params[:3], "update_proj_gap": 2, "proj_type": "std", **apollo},
    ]


@pytest.mark.parametrize(
    ("apollo", "ctor"),
    [
        ({"rank": 4, "proj": "random", "scale_type": "channel", "scale": 1.0}, {}),
        ({"rank": 1, "proj": "random", "scale_type": "tensor", "scale": 128.0}, {}),
        ({"rank": 4, "proj": "svd", "scale_type": "channel", "scale": 2.0}, {}),
        ({"rank": 2, "proj": "random", "scale_type": "tensor", "scale": 4.0}, {"scale_front": True}),
        ({"rank": 2, "proj": "random", "scale_type": "channel", "scale": 4.0}, {"disable_nl": True}),
    ],
)
def test_subclass_updates_equal_upstream_and_survive_a_weights_only_round_trip(tmp_path, apollo, ctor):
    steps, cut = 7, 3  # update_proj_gap=2: projections refreshed at steps 0, 2, 4, 6
    ref_params, grads = _params_and_grads(steps)
    ours_params, _ = _params_and_grads(steps)
    kw = {"lr": 0.01, "weight_decay": 0.05, **ctor}
    ref = UpstreamAPOLLOAdamW(_groups(ref_params, **apollo), **kw)
    ours = APOLLOAdamW(_groups(ours_params, **apollo), **kw)
    for t in range(steps):
        if t == cut:  # checkpoint, reload with weights_only into a fresh optimizer, continue
            torch.save(ours.state_dict(), tmp_path / "opt.pt")
            ours = APOLLOAdamW(_groups(ours_params, **apollo), **kw)
            ours.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        for p, q, gr in zip(ref_params, ours_params, grads[t]):
            p.grad, q.grad = gr.clone(), gr.clone()
        ref.step()
        ours.step()
        for p, q in zip(ref_params, ours_params):
            assert torch.equal(p, q), f"step {t}: the update differs from apollo-torch's"
    # upstream's own state does not survive torch.load(weights_only=True)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "ref.pt", weights_only=True)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_layerwise_update_scales_the_gradient_in_place_with_upstreams_numbers(scale_type):
    # the layerwise engine frees each gradient after its step: the scaled gradient may overwrite it
    torch.manual_seed(0)
    weight, grads = torch.randn(512, 128), [torch.randn(512, 128) for _ in range(3)]
    apollo = {"rank": 8, "proj": "random", "scale_type": scale_type, "scale": 1.0, "update_proj_gap": 200}
    result, temporaries = {}, {}
    for kind in ("upstream", "ours", "scratch"):
        p = torch.nn.Parameter(weight.clone())
        groups = [{"params": [p], "proj_type": "std", **apollo}]
        if kind == "upstream":
            opt = UpstreamAPOLLOAdamW(groups, lr=1e-2, weight_decay=0.1)
        else:
            opt = APOLLOAdamW(groups, lr=1e-2, weight_decay=0.1, gradient_is_scratch=kind == "scratch")
        for g in grads:
            p.grad = g.clone()
            if kind == "upstream":
                opt.step()
            else:
                temporaries[kind] = step_temporaries_bytes(opt)
        result[kind] = p.detach().clone()
    assert torch.equal(result["ours"], result["upstream"]) and torch.equal(
        result["scratch"], result["upstream"]
    )
    weight_bytes = weight.numel() * weight.element_size()
    assert temporaries["ours"] >= weight_bytes  # the scaled gradient, a weight-sized copy
    assert temporaries["scratch"] <= weight_bytes // 4  # the rank-8 moments' temporaries only


def test_step_closure_runs_with_gradients():
    def setup(cls):
        params, _ = _params_and_grads(1)
        opt = cls(_groups(params, rank=2, proj="random", scale_type="channel", scale=1.0), lr=0.01)

        def closure():
            opt.zero_grad()
            loss = sum((p**2).sum() for p in params)
            loss.backward()
            return loss

        return opt, closure, params

    ref_opt, ref_closure, _ = setup(UpstreamAPOLLOAdamW)
    with pytest.raises(RuntimeError, match="does not require grad"):
        ref_opt.step(ref_closure)
    opt, closure, params = setup(APOLLOAdamW)
    before = [p.detach().clone() for p in params]
    assert float(opt.step(closure).detach()) > 0
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


def test_explicit_seeds_replace_upstream_positions():
    params, _ = _params_and_grads(1)
    groups = _groups(params, rank=2, proj="random", scale_type="channel", scale=1.0)
    assert [UpstreamAPOLLOAdamW(groups).state[p]["seed"] for p in params[3:] + params[:3]] == [1, 2, 3, 4]
    ours = APOLLOAdamW(groups, seeds=[10, 11, 12, 13])
    assert [ours.state[p]["seed"] for p in params[3:] + params[:3]] == [10, 11, 12, 13]
    with pytest.raises(ValueError, match="seeds has 2 entries for 4 parameters"):
        APOLLOAdamW(groups, seeds=[1, 2])


# --- target modules ----------------------------------------------------------------------------------------
def test_guide_patterns_select_attention_and_mlp_linears_like_transformers(tmp_path):
    model = tiny_llama()
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {
        names[id(p)]
        for p in projected(make_trainer(tmp_path / "a", "apollo_adamw", model=model).create_optimizer())
    }
    linears = ("q_proj", "k_proj", "v_proj", "o_proj")
    expected = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in linears} | {
        f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")
    }
    assert ours == expected
    ref = make_trainer(tmp_path / "b", "apollo_adamw", hf=True, model=model).create_optimizer()
    assert {names[id(p)] for p in ref.param_groups[1]["params"]} == expected


def test_seed_layout_counts_frozen_parameters_like_transformers(tmp_path):
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    names = {id(p): n for n, p in model.named_parameters()}
    ours = make_trainer(tmp_path / "a", "apollo_adamw", model=model).create_optimizer()
    ref = make_trainer(tmp_path / "b", "apollo_adamw", hf=True, model=model).create_optimizer()

    def seeds(opt):
        return {names[id(p)]: opt.state[p]["seed"] for p in projected(opt) if p.requires_grad}

    assert seeds(ours) == seeds(ref) and len(seeds(ours)) == 13


# --- 4. bad input, refused before the first step ---------------------------------------------------------
def test_missing_target_modules_is_refused_with_the_fix(tmp_path):
    with pytest.raises(IncompatibleConfigError, match=r"set optim_target_modules, e\.g\."):
        training_arguments(tmp_path, optim="apollo_adamw")
    with pytest.raises(IncompatibleConfigError, match="optim_target_modules"):
        training_arguments(tmp_path, optim="apollo_mini_layerwise")


def test_pattern_matching_no_linear_lists_the_model_linears(tmp_path):
    # '.*attention.*' matches the post_attention_layernorm modules only: an error, and a warning about them
    with (
        pytest.raises(IncompatibleConfigError) as err,
        pytest.warns(UserWarning, match="post_attention_layernorm"),
    ):
        make_trainer(tmp_path, "apollo_adamw", optim_target_modules=[r".*attention.*"])
    msg = str(err.value)
    assert "matches no nn.Linear layer of LlamaForCausalLM" in msg
    assert "model.layers.0.self_attn.q_proj" in msg and "'all-linear'" in msg


def test_matched_module_that_is_not_linear_is_named_in_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"not nn\.Linear: model\.embed_tokens \(Embedding\)"):
        trainer = make_trainer(tmp_path, "apollo_adamw", optim_target_modules=["embed_tokens", "q_proj"])
    opt = trainer.create_optimizer()
    assert len(projected(opt)) == 2  # the two q_proj weights; the embedding is trained without projection


def test_guide_patterns_warn_about_nothing(tmp_path, recwarn):
    make_trainer(tmp_path, "apollo_adamw")
    assert not [w for w in recwarn if "nn.Linear" in str(w.message)]


def test_channel_scaling_needs_std_projection(tmp_path):
    # upstream raises a shape error on the first step (or broadcasts wrongly) for such combinations
    with pytest.raises(IncompatibleConfigError, match="use proj_type='std' or scale_type='tensor'"):
        make_trainer(tmp_path, "apollo_adamw", optim_args="proj_type=left")
    make_trainer(tmp_path, "apollo_adamw", optim_args="proj_type=left, scale_type=tensor")


def test_unknown_option_lists_accepted_keys(tmp_path):
    with pytest.raises(optitrainer.InvalidOptimArgsError, match="did you mean 'scale_type'"):
        training_arguments(
            tmp_path, optim="apollo_adamw", optim_target_modules=GUIDE_TARGETS, optim_args="scaletype=x"
        )


# --- 5. the guide's examples ---------------------------------------------------------------------------------
def test_guide_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with redirect_stdout(out):
        runpy.run_path(str(REPO / "examples" / "guide" / "apollo.py"), run_name="__main__")
    text = out.getvalue()
    assert "apollo_adamw: optim='apollo_adamw' rank=128 scale_type=channel scale=1, 14 projected" in text
    assert "optim='apollo_adamw' rank=1 scale_type=tensor scale=128, 14 projected" in text
    assert "optim='apollo_mini' == the guide's APOLLO-Mini optim_args: True" in text


def test_registered_from_this_distribution():
    for name in ("apollo_adamw", "apollo_mini", "apollo_adamw_layerwise", "apollo_mini_layerwise"):
        resolved = optitrainer.get_optimizer(name)
        assert resolved.provenance.distribution == "optitrainer-apollo"
    assert optitrainer.get_optimizer("apollo_adamw").spec.transformers_name == "apollo_adamw"
