"""optitrainer-pytorch-optimizer: the table, the listing, typed options, parity with upstream, a kit sample.

The full sweep (every name through the kit) is tests/test_sweep.py, behind OPTITRAINER_BRIDGE_SWEEP=1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from optitrainer_pytorch_optimizer import EXCLUDED, ROWS, SPECS

import optitrainer
from optitrainer import InvalidOptimArgsError, OptiTrainer
from optitrainer.testing import (
    SyntheticLMDataset,
    check_layerwise_matches_standard,
    check_refusals,
    check_resume,
    check_scheduled_lr_reaches_update,
    conformance_cases,
    run_training,
    tiny_llama,
    training_arguments,
)

PLUGIN = Path(__file__).resolve().parents[1]
DIST = "optitrainer-pytorch-optimizer"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
#: six names spread evenly over the alphabetical table (the same six on every run)
SAMPLE = [ROWS[i * len(ROWS) // 6].name for i in range(6)]
#: the first layerwise name of the table, checked layerwise == standard in the default run
LAYERWISE_SAMPLE = next((r.name for r in ROWS if r.layerwise), None)


def _inner(opt):
    return getattr(opt, "optimizer", opt)


# --- 1. the table ---------------------------------------------------------------------------------------


def test_table_is_what_the_generator_writes_from_upstream_and_the_sweep():
    """Signatures, defaults, helps and sweep verdicts: regenerating changes nothing."""
    sys.path.insert(0, str(PLUGIN / "tools"))
    try:
        import generate_table
    finally:
        sys.path.pop(0)
    rows, excluded = generate_table.generate(generate_table.load_verdicts())
    assert [r._asdict() for r in ROWS] == rows
    assert EXCLUDED == excluded
    verdicts = generate_table.load_verdicts()
    assert {r.upstream for r in ROWS} <= set(verdicts), "every name went through the sweep"
    unchecked = [
        r.upstream
        for r in ROWS
        if any("kit_" + c not in verdicts[r.upstream] for c in generate_table.KIT_CHECKS)
    ]
    assert not unchecked, (
        f"not through the kit's learns/options yet: tools/sweep.py --kit {' '.join(unchecked)}"
    )


def test_at_least_80_names_every_optimizer_either_in_or_excluded_with_a_reason():
    from pytorch_optimizer.optimizer import OPTIMIZERS

    assert len(ROWS) >= 80
    assert {r.upstream for r in ROWS} | set(EXCLUDED) == set(OPTIMIZERS)
    assert not {r.upstream for r in ROWS} & set(EXCLUDED)
    assert all(reason.strip() for reason in EXCLUDED.values())


def test_listing_imports_neither_torch_nor_upstream():
    code = (
        "import sys, optitrainer_pytorch_optimizer as m; "
        "assert len(m.SPECS) == len(m.ROWS); "
        "bad = [x for x in ('torch', 'pytorch_optimizer', 'transformers') if x in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_entry_point_registers_every_name_without_shadowing():
    listed = {i.name: i for i in optitrainer.list_optimizers()}
    ours = {s.name for s in SPECS}
    assert ours <= set(listed)
    assert {listed[n].provenance.distribution for n in ours} == {DIST}
    assert all(n.startswith("po_") for n in ours)
    # no name transformers knows, and nobody else's name
    assert not ours & {o.value for o in transformers.training_args.OptimizerNames}
    others = {n for n, i in listed.items() if i.provenance.distribution != DIST}
    assert not ours & others


def test_options_are_typed_from_the_constructor():
    spec = {s.name: s for s in SPECS}
    adan = spec["po_adan"].option_map
    assert adan["betas"].type is tuple and adan["betas"].default == (0.98, 0.92, 0.99)
    assert adan["betas"].length == 3
    prodigy = spec["po_prodigy"]
    assert prodigy.recommended_lr == 1.0
    assert prodigy.option_map["growth_rate"].default is None  # upstream's inf, which optim_args cannot spell
    assert prodigy.option_map["d_coef"].type is float
    assert spec["po_a2grad" if "po_a2grad" in spec else "po_adabelief"].options
    assert spec["po_adabelief"].option_map["n_sma_threshold"].type is int
    assert "betas" not in spec["po_adabelief"].option_map  # (0.9, 0.999): from adam_beta1/adam_beta2
    assert all(o.help for s in SPECS for o in s.options)


def test_string_options_offer_what_upstream_accepts(tmp_path):
    """Free text upstream refuses (all but its default) would be an option that does nothing: choices instead."""
    free = [(r.name, o[0]) for r in ROWS for o in r.options if o[1] == "str" and "choices" not in o[4]]
    assert not free
    spec = {s.name: s for s in SPECS}
    assert "fused" not in spec["po_flashadamw"].option_map  # True always raises upstream
    for name in ("po_muon", "po_adamuon", "po_normuon"):  # presets only: coefficient tuples are refused
        assert spec[name].option_map["ns_coeffs"].choices == (
            "original",
            "quintic",
            "polar_express",
            "polar_express_safer",
        )
    args = training_arguments(
        tmp_path, optim="po_normuon", optim_args="ns_coeffs=quintic, update_scale=match_rms"
    )
    opt = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8)).create_optimizer()
    muon = next(g for g in opt.param_groups if g["use_muon"])
    assert (len(muon["ns_coeffs"]), muon["update_scale"]) == (
        5,
        "match_rms",
    )  # quintic: 5 coefficient triples


@pytest.mark.parametrize("bits,width", [(None, 0), (24, 3), (32, 4)])
def test_flashadamw_master_weight_bits_reach_bf16_weights(tmp_path, bits, width):
    """The kit cannot show it (upstream refuses it on fp32 weights): error correction on a bf16 model."""
    args = training_arguments(tmp_path, optim="po_flashadamw", optim_args={"master_weight_bits": bits})
    model = tiny_llama().to(torch.bfloat16)
    opt = OptiTrainer(model=model, args=args, train_dataset=SyntheticLMDataset(n=8)).create_optimizer()
    data = SyntheticLMDataset(n=4)
    model(**{k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]}).loss.backward()
    opt.step()
    assert opt.param_groups[0]["master_byte_width"] == width
    assert ("error_bits" in opt.state[model.lm_head.weight]) == (bits is not None)


def test_bad_values_are_refused_with_the_key(tmp_path):
    for name, optim_args, key in [
        ("po_adabelief", "rectify=maybe", "rectify"),
        ("po_adabelief", "n_sma_threshold=4.5", "n_sma_threshold"),
        ("po_adan", "betas=(0.9,0.99)", "betas"),
        ("po_prodigy", "d_coef=inf", "d_coef"),
        ("po_adabelief", "rnak=3", "rnak"),
    ]:
        with pytest.raises(InvalidOptimArgsError, match=key):
            training_arguments(tmp_path, optim=name, optim_args=optim_args)


def test_typed_values_reach_the_upstream_groups(tmp_path):
    args = training_arguments(
        tmp_path, optim="po_prodigy", optim_args="d_coef=0.5, safeguard_warmup=False", adam_beta2=0.99
    )
    opt = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset(n=8)).create_optimizer()
    g = opt.param_groups[0]
    assert (g["d_coef"], g["safeguard_warmup"], g["growth_rate"], g["betas"]) == (
        0.5,
        False,
        float("inf"),
        (0.9, 0.99),
    )


# --- 2. parity with the upstream class used directly ------------------------------------------------------

PARITY = [
    # (name, upstream kwargs besides lr/weight_decay, optim_args, training-argument overrides)
    ("po_adabelief", {"betas": (0.9, 0.95), "rectify": True}, "rectify=True", {"adam_beta2": 0.95}),
    ("po_lion", {"betas": (0.95, 0.98)}, "betas=(0.95,0.98)", {}),
    ("po_prodigy", {"d_coef": 0.5}, "d_coef=0.5", {"learning_rate": 1.0}),
]


def _upstream(name):
    row = next(r for r in ROWS if r.name == name)
    import importlib

    return getattr(importlib.import_module(row.module), row.cls)


def _groups(model, weight_decay):
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


@pytest.mark.parametrize("name,kwargs,optim_args,overrides", PARITY, ids=[p[0] for p in PARITY])
def test_bit_identical_to_the_upstream_class_on_the_same_model_and_data(
    tmp_path, name, kwargs, optim_args, overrides
):
    s = {"learning_rate": 1e-3, "weight_decay": 0.05, **overrides}
    ours_model, ref_model = tiny_llama(), tiny_llama()
    args = training_arguments(tmp_path, optim=name, optim_args=optim_args, **s)
    ours = OptiTrainer(model=ours_model, args=args, train_dataset=SyntheticLMDataset(n=8)).create_optimizer()
    cls = _upstream(name)
    ref = cls(
        _groups(ref_model, s["weight_decay"]), lr=s["learning_rate"], weight_decay=s["weight_decay"], **kwargs
    )
    assert type(ours) is cls
    data = SyntheticLMDataset(n=24)
    for step in range(6):
        batch = {k: torch.stack([data[4 * step + i][k] for i in range(4)]) for k in data[0]}
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    for (n, a), (_, b) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(a, b), n


def test_soap_merge_dims_trains_where_upstream_crashes_and_keeps_its_numbers_elsewhere(tmp_path):
    """Upstream's merge_dims=True crashes on a tensor whose dimensions all merge into one (a 4x4 weight under
    max_precondition_dim=16, any 1-D tensor); the bridge's subclass (``_fixes.py``) trains it and equals upstream bit for
    bit where upstream works (8x8 and 6x8 weights, no 1-D tensor: nothing merges into one)."""
    args = training_arguments(
        tmp_path, optim="po_soap", optim_args="merge_dims=True, max_precondition_dim=16"
    )
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))

    def run(model, opt, steps=3):
        for _ in range(steps):
            model(x[:, : model[0].in_features]).square().mean().backward()
            opt.step()
            opt.zero_grad()

    collapsing = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    with pytest.raises(RuntimeError, match="invalid for input of size 16"):
        run(
            collapsing,
            _upstream("po_soap")(collapsing.parameters(), merge_dims=True, max_precondition_dim=16),
        )
    ours = OptiTrainer(model=collapsing, args=args, train_dataset=SyntheticLMDataset(n=8)).create_optimizer()
    before = collapsing[0].weight.detach().clone()
    run(collapsing, ours)
    assert torch.isfinite(collapsing[0].weight).all() and not torch.equal(collapsing[0].weight, before)

    models = [
        torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 6, bias=False))
        for _ in range(2)
    ]
    models[1].load_state_dict(models[0].state_dict())
    ours = OptiTrainer(model=models[0], args=args, train_dataset=SyntheticLMDataset(n=8)).create_optimizer()
    ref = _upstream("po_soap")(_groups(models[1], 0.0), lr=1e-3, merge_dims=True, max_precondition_dim=16)
    run(models[0], ours)
    run(models[1], ref)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_trainer_run_equals_transformers_trainer_with_the_upstream_optimizer(tmp_path):
    """transformers.Trainer(optimizers=(upstream instance, None)) on the same model and data: same bits."""
    s = {"learning_rate": 3e-3, "weight_decay": 0.05, "warmup_steps": 2}
    ours = run_training("po_adabelief", tmp_path / "ours", steps=6, **s)
    model = tiny_llama()
    ref_opt = _upstream("po_adabelief")(_groups(model, 0.05), lr=3e-3, weight_decay=0.05)
    args = training_arguments(
        tmp_path / "ref", arguments_cls=transformers.TrainingArguments, optim="adamw_torch", max_steps=6, **s
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=SyntheticLMDataset(), optimizers=(ref_opt, None)
    )
    trainer.train()
    ref_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]
    assert ours.losses == ref_losses
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, ours.params[n]), n


# --- 3. the kit on a deterministic sample (the full sweep: tests/test_sweep.py) ---------------------------


@pytest.mark.parametrize("name", SAMPLE)
def test_kit_sample_refusals_and_scheduled_lr(name, tmp_path):
    (case,) = [c for c in conformance_cases([name]) if c.optim == name]
    check_refusals(case)
    check_scheduled_lr_reaches_update(case, tmp_path)


@pytest.mark.parametrize("name", SAMPLE[:1])
def test_kit_sample_resume(name, tmp_path):
    (case,) = [c for c in conformance_cases([name]) if c.optim == name]
    check_resume(case, tmp_path)


def test_kit_sample_layerwise_matches_standard(tmp_path):
    (case,) = [c for c in conformance_cases([LAYERWISE_SAMPLE]) if c.optim.endswith("_layerwise")]
    check_layerwise_matches_standard(case, tmp_path)
