"""The built-in ``adafactor``: transformers' Adafactor bit for bit, with one weight-sized temporary."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.optimization import Adafactor

from optitrainer._adafactor import LeanAdafactor
from optitrainer.testing import step_temporaries_bytes

SETTINGS = [
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False},
    {"lr": 1e-2, "relative_step": False, "scale_parameter": True, "beta1": 0.9, "weight_decay": 0.1},
    {"lr": None, "relative_step": True, "warmup_init": True, "clip_threshold": 0.5},
]


def _weights(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 64), (64,), (3, 8, 16)]  # factored, unfactored, factored over the last two dims
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _train(cls, settings: dict, dtype: torch.dtype, steps: int = 5, state: dict | None = None):
    params = _weights(dtype)
    opt = cls(params, **settings)
    if state is not None:
        opt.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "beta1-decay-scaled", "relative-step"])
def test_same_bits_as_transformers_adafactor(settings, dtype):
    ours, _ = _train(LeanAdafactor, settings, dtype)
    theirs, _ = _train(Adafactor, settings, dtype)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_checkpoint_loads_into_either_class_and_continues_identically():
    settings = SETTINGS[1]
    _, lean = _train(LeanAdafactor, settings, torch.float32, steps=3)
    state = lean.state_dict()
    # 3 more steps from the same state in each class; the weights come from _weights again, so only the
    # optimizer state carries over: what matters is that both classes read it the same way
    # (load_state_dict keeps the state's tensors, which the steps then change: a copy for each)
    ours, _ = _train(LeanAdafactor, settings, torch.float32, steps=3, state=copy.deepcopy(state))
    theirs, _ = _train(Adafactor, settings, torch.float32, steps=3, state=copy.deepcopy(state))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("shape", [(512, 256), (4096,)], ids=["factored", "unfactored"])
def test_one_weight_sized_temporary_instead_of_two(shape):
    measured = {}
    for cls in (Adafactor, LeanAdafactor):
        p = torch.nn.Parameter(torch.randn(shape))
        opt = cls([p], lr=1e-2, relative_step=False, beta1=0.9)
        for _ in range(2):  # the first step creates the state; the second is the steady state
            p.grad = torch.randn(shape)
            measured[cls] = step_temporaries_bytes(opt)
    weight_bytes = torch.Size(shape).numel() * 4
    assert measured[Adafactor] >= 2 * weight_bytes  # upstream: the square and the estimate, or -update
    assert measured[LeanAdafactor] <= weight_bytes * 1.05  # plus row/column statistics
