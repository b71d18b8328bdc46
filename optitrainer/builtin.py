"""The optimizers of the core distribution, registered through its own entry points.

They need nothing beyond torch and transformers, and use only :mod:`optitrainer.plugin`. Defaults
equal ``transformers.Trainer``'s so that the same arguments train to the same numbers.
"""

from __future__ import annotations

import re

from .plugin import BuildContext, Capabilities, OptimizerSpec, Option, needs_torch

#: elementwise updates: right on flattened ZeRO partitions and FSDP shards too
ELEMENTWISE = Capabilities(layerwise=True, distributed=frozenset({"ddp", "deepspeed", "fsdp"}))
TORCH = ("torch",)


def _adamw(ctx: BuildContext, fused: bool = False):
    from torch.optim import AdamW

    kwargs = {"lr": ctx.lr, **ctx.adam_kwargs()}
    if fused:
        kwargs["fused"] = True
    elif ctx.layerwise:
        # The for-each form divides its denominator in place: one parameter-sized temporary where the
        # per-tensor form (torch's default on CPU) holds two, which sets the layerwise engine's peak.
        # Same operations in the same order: bit-identical (test_layerwise_equals_standard_under_a_schedule).
        kwargs["foreach"] = True
    return AdamW(ctx.param_groups(), **kwargs)


def _adamw_fused(ctx: BuildContext):
    return _adamw(ctx, fused=True)


ADAMW_TORCH = OptimizerSpec(
    name="adamw_torch",
    factory=_adamw,
    summary="torch.optim.AdamW (betas, eps and weight decay from the training arguments)",
    imports=TORCH,
    capabilities=ELEMENTWISE,
    transformers_name="adamw_torch",
)

ADAMW_TORCH_FUSED = OptimizerSpec(
    name="adamw_torch_fused",
    factory=_adamw_fused,
    summary="torch.optim.AdamW(fused=True): one kernel for the whole update",
    imports=TORCH,
    capabilities=ELEMENTWISE,
    transformers_name="adamw_torch_fused",
)


def _sgd(ctx: BuildContext):
    import torch

    o = ctx.options
    return torch.optim.SGD(
        ctx.param_groups(),
        lr=ctx.lr,
        momentum=o["momentum"],
        dampening=o["dampening"],
        nesterov=o["nesterov"],
    )


SGD = OptimizerSpec(
    name="sgd",
    factory=_sgd,
    summary="torch.optim.SGD, optionally with (Nesterov) momentum",
    imports=TORCH,
    options=(
        Option("momentum", float, 0.0, "momentum factor", low=0.0),
        Option("dampening", float, 0.0, "dampening for momentum", low=0.0),
        Option("nesterov", bool, False, "Nesterov momentum (needs momentum > 0 and dampening = 0)"),
    ),
    capabilities=ELEMENTWISE,
    transformers_name="sgd",
)


def _adagrad(ctx: BuildContext):
    import torch

    o = ctx.options
    return torch.optim.Adagrad(
        ctx.param_groups(),
        lr=ctx.lr,
        lr_decay=o["lr_decay"],
        eps=o["eps"],
        initial_accumulator_value=o["initial_accumulator_value"],
    )


ADAGRAD = OptimizerSpec(
    name="adagrad",
    factory=_adagrad,
    summary="torch.optim.Adagrad",
    imports=TORCH,
    options=(
        Option("lr_decay", float, 0.0, "learning-rate decay", low=0.0),
        Option("eps", float, 1e-10, "term added to the denominator", low=0.0),
        Option("initial_accumulator_value", float, 0.0, "initial sum of squares", low=0.0),
    ),
    capabilities=Capabilities(
        layerwise=True,
        distributed=frozenset({"ddp", "fsdp"}),
        distributed_note="DeepSpeed rebuilds torch's Adagrad (whose state exists from construction) as one "
        "parameter group: the weight-decay groups and the scheduled learning rate would be lost",
    ),
    transformers_name="adagrad",
)


def _rmsprop(ctx: BuildContext):
    import torch

    o = ctx.options
    return torch.optim.RMSprop(
        ctx.param_groups(),
        lr=ctx.lr,
        alpha=o["alpha"],
        eps=o["eps"],
        momentum=o["momentum"],
        centered=o["centered"],
    )


RMSPROP = OptimizerSpec(
    name="rmsprop",
    factory=_rmsprop,
    summary="torch.optim.RMSprop",
    imports=TORCH,
    options=(
        Option("alpha", float, 0.99, "smoothing constant", low=0.0, high=1.0),
        Option("eps", float, 1e-8, "term added to the denominator", low=0.0),
        Option("momentum", float, 0.0, "momentum factor", low=0.0),
        Option("centered", bool, False, "normalize by the estimated gradient variance"),
    ),
    capabilities=ELEMENTWISE,
    transformers_name="rmsprop",
)


def _adafactor(ctx: BuildContext):
    from ._adafactor import LeanAdafactor

    o = ctx.options
    return LeanAdafactor(
        ctx.param_groups(),
        lr=ctx.lr,
        scale_parameter=o["scale_parameter"],
        relative_step=False,
        warmup_init=False,
        clip_threshold=o["clip_threshold"],
        decay_rate=o["decay_rate"],
        beta1=o["beta1"],
    )


ADAFACTOR = OptimizerSpec(
    name="adafactor",
    factory=_adafactor,
    summary="transformers' Adafactor with an external learning rate (factored second moments)",
    imports=("transformers",),
    options=(
        Option("scale_parameter", bool, False, "scale the learning rate by the parameter's RMS"),
        Option("clip_threshold", float, 1.0, "threshold of the update's root mean square", low=0.0),
        Option("decay_rate", float, -0.8, "coefficient of the second-moment running average"),
        Option(
            "beta1", float, None, "first-moment coefficient; None keeps no first moment", low=0.0, high=1.0
        ),
    ),
    capabilities=Capabilities(
        layerwise=True,
        distributed=frozenset({"ddp"}),
        distributed_note="its factored second moments need each weight whole and 2-D; "
        "ZeRO flattens and FSDP shards them",
    ),
    transformers_name="adafactor",
    docs="The learning rate comes from the trainer's schedule (`relative_step=False`), as in transformers. "
    "Its step is transformers' arithmetic, bit for bit, with one weight-sized temporary instead of two.",
)


# --- Muon -------------------------------------------------------------------------------------

MUON_DEFAULT_EXCLUDE = r"(^|\.)(embed_tokens|embed_positions|wte|wpe|lm_head|embed_out|output)(\.|$)"


def muon_split(named_params, exclude: str):
    """Split ``(name, param)`` pairs into Muon's (2-D hidden weights) and AdamW's (the rest)."""
    pattern = re.compile(exclude) if exclude else None
    muon, rest = [], []
    for name, p in named_params:
        hidden_matrix = p.ndim == 2 and not (pattern and pattern.search(name))
        (muon if hidden_matrix else rest).append((name, p))
    return muon, rest


def _muon(ctx: BuildContext):
    from ._muon import MuonWithAuxAdamW

    o = ctx.options
    muon_named, rest_named = muon_split(ctx.named_parameters(), o["exclude"])
    muon_ids = {id(p) for _, p in muon_named}
    groups = ctx.param_groups()
    muon_groups = [{**g, "params": [p for p in g["params"] if id(p) in muon_ids]} for g in groups]
    adam_groups = [{**g, "params": [p for p in g["params"] if id(p) not in muon_ids]} for g in groups]
    return MuonWithAuxAdamW(
        [g for g in muon_groups if g["params"]],
        [g for g in adam_groups if g["params"]],
        lr=ctx.lr,
        muon_kwargs={
            "momentum": o["momentum"],
            "nesterov": o["nesterov"],
            "ns_steps": o["ns_steps"],
            "adjust_lr_fn": o["adjust_lr_fn"],
        },
        adamw_kwargs=ctx.adam_kwargs(),
    )


MUON = OptimizerSpec(
    name="muon",
    factory=_muon,
    summary="torch.optim.Muon on 2-D hidden weights, AdamW on embeddings, head, norms and biases",
    imports=TORCH,
    options=(
        Option("momentum", float, 0.95, "Muon momentum", low=0.0, high=1.0),
        Option("nesterov", bool, True, "Nesterov momentum for Muon"),
        Option("ns_steps", int, 5, "Newton-Schulz iterations", low=1),
        Option(
            "adjust_lr_fn",
            str,
            "match_rms_adamw",
            "how Muon rescales the learning rate; match_rms_adamw lets it share AdamW's learning rate",
            choices=("match_rms_adamw", "original"),
        ),
        Option(
            "exclude",
            str,
            MUON_DEFAULT_EXCLUDE,
            "regex (searched in parameter names) of 2-D weights that go to AdamW instead of Muon",
        ),
    ),
    capabilities=Capabilities(
        distributed=frozenset({"ddp"}),
        distributed_note="Newton-Schulz orthogonalizes whole 2-D weights; ZeRO flattens and FSDP shards them",
    ),
    validate_arguments=lambda args, options: needs_torch("2.9", "torch.optim.Muon", "muon"),
    docs=(
        "Muon orthogonalizes the update of each hidden weight matrix. Every 2-D parameter whose name does "
        "not match `exclude` (by default: token/position embeddings and the output head) goes to "
        "`torch.optim.Muon`; everything else (embeddings, head, norms, biases) goes to `torch.optim.AdamW` "
        "with the arguments' betas and eps. Both follow the trainer's learning rate and weight decay."
    ),
)
