"""``optitrainer_badam.BlockOptimizer`` against upstream's ``badam.BlockOptimizer`` used directly."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
from optitrainer_badam.optimizer import BlockOptimizer

# a decoder-like model: 3 layers (a weight, a bias, a norm each), an embedding, a head
SHAPES = {"model.embed_tokens.weight": (6, 4)}
for _i in range(3):
    SHAPES |= {
        f"model.layers.{_i}.mlp.weight": (4, 4),
        f"model.layers.{_i}.mlp.bias": (4,),
        f"model.layers.{_i}.input_layernorm.weight": (4,),
    }
SHAPES |= {"model.norm.weight": (4,), "lm_head.weight": (6, 4)}
NO_DECAY = {n for n in SHAPES if "bias" in n or "norm" in n}


def _named(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))) for n, s in SHAPES.items()]


def _groups(named, wd):
    """The trainer's two groups (decayed, then biases and norms) at weight decays ``wd``."""
    return [
        {"params": [p for n, p in named if n not in NO_DECAY], "weight_decay": wd[0]},
        {"params": [p for n, p in named if n in NO_DECAY], "weight_decay": wd[1]},
    ]


def _quiet():
    """Upstream prints at every switch and warns about fp32 weights."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _pair(dtype=torch.float32, wd=(0.1, 0.1), default_wd=0.1, seed=7, **kwargs):
    """Upstream and ours over identical parameters: groups at ``wd``, the base's default ``default_wd``.

    Upstream applies ``default_wd`` to every active parameter: equal to ``wd`` the two agree.
    """
    from badam import BlockOptimizer as Upstream

    up_named, our_named = _named(dtype), _named(dtype)
    kw = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": default_wd}
    with _quiet():
        torch.manual_seed(seed)  # upstream draws its random block order from the global RNG
        up = Upstream(torch.optim.AdamW(_groups(up_named, wd), **kw), up_named, verbose=0, **kwargs)
        ours = BlockOptimizer(torch.optim.AdamW(_groups(our_named, wd), **kw), our_named, seed=seed, **kwargs)
    return (up_named, up), (our_named, ours)


def _step(pairs, steps, gen, lrs=None):
    for step in range(steps):
        grads = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
        for named, opt in pairs:
            for n, p in named:
                p.grad = grads[n].to(p.dtype) if p.requires_grad else None
            for group in opt.param_groups:
                group["lr"] = 1e-2 if lrs is None else lrs[step]  # what the trainer's scheduler does
            with _quiet():
                opt.step()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"switch_mode": "ascending", "switch_block_every": 2},
        {"switch_mode": "descending", "switch_block_every": 3},
        {"switch_mode": "random", "switch_block_every": 1},
        {"switch_mode": "fixed", "start_block": 1, "switch_block_every": 2},
        {"switch_mode": "ascending", "switch_block_every": 2, "start_block": 2, "include_lm_head": True},
        {
            "switch_mode": "ascending",
            "switch_block_every": 1,
            "block_prefix_list": [["layers.0.", "norm"], ["lm_head"]],
        },
        {"switch_mode": "descending", "switch_block_every": 2, "active_modules": ["lm_head"]},
    ],
    ids=["ascending", "descending", "random", "fixed", "start+head", "prefixes", "active_modules"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_is_upstreams_bit_for_bit(kwargs, dtype):
    (up_named, up), (our_named, ours) = pairs = _pair(dtype, **kwargs)
    assert ours.block_prefix_list == up.block_prefix_list
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):  # through several switches (and, for random, new permutations)
        _step(pairs, 3, gen, lrs=[3e-2, 2e-2, 1e-2])
        assert ours.current_block_idx == up.current_block_idx and ours.global_step == up.global_step
        assert ours.active_param_prefixs == up.active_param_prefixs
        for (n, a), (_, b) in zip(up_named, our_named):
            assert torch.equal(a, b), n
            assert a.requires_grad == b.requires_grad, n


def test_state_only_for_the_active_block_and_no_master_copy_in_fp32():
    (_, up), (our_named, ours) = pairs = _pair(switch_mode="ascending", switch_block_every=3)
    _step(pairs, 1, torch.Generator().manual_seed(1))
    block = {n for n, _ in our_named if n.startswith("model.layers.0.")}
    active = {n for n, p in our_named if p.requires_grad}
    assert active == block
    by_id = {id(p): n for n, p in our_named}
    assert {by_id[id(p)] for p in ours.base_optimizer.state} == block  # keyed by the parameters themselves
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in ours.base_optimizer.state.values()
        for t in s.values()
        if t.dim()
    )
    assert state_bytes == 2 * sum(p.numel() * p.element_size() for n, p in our_named if n in block)
    # upstream keeps an fp32 copy of fp32 weights (one block of extra memory); ours updates in place
    assert all(hp is not lp for lp, hp in zip(up.param_idx2lp.values(), up.param_idx2hp.values()))
    assert all(hp is lp for lp, hp in zip(ours.param_idx2lp.values(), ours.param_idx2hp.values()))


def test_weight_decay_follows_the_given_groups():
    """Upstream decays every active parameter at the base optimizer's *default* decay, norms included.

    LLaMA-Factory builds the base AdamW without ``weight_decay`` (torch's default 0.01 then applies to
    every active parameter, whatever ``weight_decay`` the arguments say); ours keeps the groups'.
    """
    (up_named, up), (our_named, ours) = pairs = _pair(wd=(0.5, 0.0), default_wd=0.01, switch_mode="ascending")
    ref_named = _named()
    ref = torch.optim.AdamW(_groups(ref_named, (0.5, 0.0)), lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    gen = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    for named, opt in [*pairs, (ref_named, ref)]:
        for n, p in named:
            p.grad = grads[n].clone() if n.startswith("model.layers.0.") else None
        with _quiet():
            opt.step()
    for (n, u), (_, o), (_, r) in zip(up_named, our_named, ref_named):
        assert torch.equal(o, r), n  # ours: plain AdamW with the given groups, restricted to the block
        if n.startswith("model.layers.0."):
            assert not torch.equal(u, r), n  # upstream: decay 0.01 on all three, not 0.5 / none
    assert {g["weight_decay"] for g in up.base_optimizer.param_groups} == {0.01}


def test_state_dict_holds_the_schedule_and_loads_weights_only(tmp_path):
    (_, _), (our_named, ours) = _pair(switch_mode="random", switch_block_every=2, include_lm_head=True)
    gen = torch.Generator().manual_seed(1)
    _step([(our_named, ours)], 2, gen)  # a switch after step 1, then one step on the new block
    torch.save(ours.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert sd["badam"]["active_block"] == ours.active_block and sd["badam"]["global_step"] == 2
    assert sd["badam"]["num_blocks"] == 4 and sd["badam"]["switch_mode"] == "random"
    assert torch.equal(sd["badam"]["generator"], ours._generator.get_state())
    names = [n for n, _ in our_named]
    flat = [id(p) for g in ours.param_groups for p in g["params"]]
    index_name = {flat.index(id(p)): n for n, p in our_named}
    assert {index_name[i] for i in sd["state"]} == {n for n, p in our_named if p.requires_grad}
    assert len(sd["param_groups"]) == 2 and sorted(
        sum((g["params"] for g in sd["param_groups"]), [])
    ) == list(range(len(names)))

    # a fresh optimizer (another start block, another seed) continues exactly
    (_, _), (fresh_named, fresh) = _pair(
        switch_mode="random", switch_block_every=2, include_lm_head=True, seed=99
    )
    with torch.no_grad():
        for (_, a), (_, b) in zip(fresh_named, our_named):
            a.copy_(b)
    fresh.load_state_dict(sd)
    assert [p.requires_grad for _, p in fresh_named] == [p.requires_grad for _, p in our_named]
    state = gen.get_state()
    _step([(our_named, ours)], 7, gen)
    _step([(fresh_named, fresh)], 7, torch.Generator().set_state(state))
    for (n, a), (_, b) in zip(our_named, fresh_named):
        assert torch.equal(a, b), n


def test_upstream_state_dict_resumes_into_the_wrong_block():
    """Why the schedule must be saved: upstream's state loads into whatever block a fresh optimizer starts with."""
    (up_named, up), _ = _pair(switch_mode="ascending", switch_block_every=2)
    _step([(up_named, up)], 2, torch.Generator().manual_seed(1))  # block 1 is active now
    sd = up.state_dict()
    (fresh_named, fresh), _ = _pair(switch_mode="ascending", switch_block_every=2)
    fresh.load_state_dict(sd)  # no error: block 0 has the same shapes
    assert fresh.active_param_prefixs != up.active_param_prefixs
    assert "global_step" not in sd and fresh.global_step == 0
    # ours refuses such a checkpoint, saying why
    _, (_, ours) = _pair(switch_mode="ascending", switch_block_every=2)
    with pytest.raises(ValueError, match="no 'badam' entry"):
        ours.load_state_dict(sd)


def test_start_block_with_random_order():
    """Upstream fails to build with both (``block_order`` is only drawn without a start block)."""
    with pytest.raises(AttributeError, match="block_order"):
        _pair(switch_mode="random", start_block=1, switch_block_every=1)
    named = _named()
    ours = BlockOptimizer(
        torch.optim.AdamW(_groups(named, (0.0, 0.0))), named, switch_mode="random", start_block=1
    )
    assert ours.active_block == 1
    _step([(named, ours)], 4, torch.Generator().manual_seed(1))
    assert ours.global_step == 4


def test_refusals_say_what_to_do():
    named = _named()
    base = torch.optim.AdamW(_groups(named, (0.0, 0.0)))
    with pytest.raises(ValueError, match="start_block"):
        BlockOptimizer(base, named, switch_mode="fixed")
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        BlockOptimizer(base, named, block_prefix_list=[["layers.0."], ["decoder.blocks.0."]])
    with pytest.raises(ValueError, match="out of range"):
        BlockOptimizer(base, named, start_block=3)
    with pytest.raises(ValueError, match="block_prefixes"):
        BlockOptimizer(base, [(n.replace("layers", "h"), p) for n, p in named])


def test_restore_requires_grad():
    (_, _), (our_named, ours) = _pair(switch_mode="ascending")
    assert sum(p.requires_grad for _, p in our_named) == 3
    ours.restore_requires_grad()
    assert all(p.requires_grad for _, p in our_named)
    ours.apply_requires_grad()
    assert sum(p.requires_grad for _, p in our_named) == 3


def test_bf16_resume_keeps_the_fp32_master_copies(tmp_path):
    """Mid-block, the fp32 masters hold bits the bf16 weights lost: rebuilt from the weights, they differ."""
    (_, _), (named, ours) = _pair(torch.bfloat16, switch_mode="ascending", switch_block_every=5)
    gen = torch.Generator().manual_seed(1)
    _step([(named, ours)], 2, gen)  # inside the first block (4 steps)
    torch.save(ours.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert {v.dtype for v in sd["badam"]["masters"].values()} == {torch.float32}
    masters = list(ours.param_idx2hp.values())
    assert any(not torch.equal(m, lp.float()) for m, lp in zip(masters, ours.param_idx2lp.values()))

    fresh = []
    for drop_masters in (False, True):
        (_, _), (f_named, f_opt) = _pair(torch.bfloat16, switch_mode="ascending", switch_block_every=5)
        with torch.no_grad():
            for (_, a), (_, b) in zip(f_named, named):
                a.copy_(b)
        loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
        if drop_masters:
            loaded["badam"].pop("masters")  # what upstream's rebuild from the weights gives
        f_opt.load_state_dict(loaded)
        fresh.append(f_named)
        _step([(f_named, f_opt)], 4, torch.Generator().set_state(gen.get_state()))
    _step([(named, ours)], 4, gen)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(named, fresh[0]))
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(named, fresh[1]))
