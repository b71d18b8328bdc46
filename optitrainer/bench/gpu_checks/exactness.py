"""Rows that compare an optimizer's update with a reference computed another way.

**Clipped step against torch** (``adamw_torch_layerwise``, ``lomo``, ``adamw_torch_fused``): float32
weights under bf16 autocast, one step clipped at half the gradient norm, so clipping is engaged
whatever the model. The reference is a fresh copy of the model that runs the batch the trainer ran
(captured from its forward), a plain ``loss.backward()``, ``torch.nn.utils.clip_grad_norm_`` and
torch's ``SGD`` / ``AdamW``. Passes when

* the logged ``grad_norm`` is the plain backward's norm within ``NORM_RTOL`` = 1e-3: both come from the
  same kernels on the same inputs; what may differ is the summation order of the norm and, on CUDA, the
  atomics of the attention backward (about 1e-6 of the norm). A gradient left out or counted twice
  moves it by more unless that gradient is under a thousandth of the norm;
* the update (new weights minus initial ones) equals the reference's within ``UPDATE_RTOL`` = 1e-2 of
  its norm over the whole model and ``TENSOR_RTOL`` = 5e-2 for the worst tensor. The rates make each
  step thousands of float32 ulps of the weights, so rounding stays near 1e-4; a wrong clipping
  coefficient (SGD/LOMO: the step is proportional to it, and it is 0.5 here), learning rate, epsilon or
  a stale gradient is off by tens of percent. Adam's first step is nearly sign(gradient) and hides the
  coefficient: LOMO's SGD step is what tests it.

**AdaLomo against lomo-optim** (CUDA only: upstream allocates its statistics with ``.cuda()``):
optitrainer's AdaLomo and upstream ``lomo_optim.AdaLomo`` on two bfloat16 copies of the model (the
setting LOMO is made for: no float32 weights), eager attention (deterministic backward), two steps
of the same batch with clipping at 1.0. The arithmetic is upstream's operation for operation, so the
weights should be bit-identical; allowed: each weight within one bfloat16 ulp of upstream's (a last-bit
difference in float32 can round the other way) and at most ``DIFFERING_MAX`` = 0.1 % of them differing
at all (a formula error of even 10 % of the step flips about a fifth of them), the clipping norms within
1e-4, the second-moment statistics within 1e-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .plan import OPTITRAINER, ExactnessCheck
from .train import Context, build_trainer, dataset
from .verify import Finding

NORM_RTOL = 1e-3
UPDATE_RTOL = 1e-2
TENSOR_RTOL = 5e-2
ADALOMO_CLIP = 1.0
ADALOMO_NORM_RTOL = 1e-4
ADALOMO_STATS_RTOL = 1e-2
DIFFERING_MAX = 1e-3


@dataclass
class CheckOutcome:
    findings: list[Finding]
    details: dict[str, Any] = field(default_factory=dict)


def run_check(ctx: Context, check: ExactnessCheck) -> CheckOutcome:
    if check.reference == "lomo-optim":
        return adalomo_matches_upstream(ctx, check)
    return clipped_step_matches_torch(ctx, check)


def first_batch(ctx: Context, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The dataset's sequences in order, collated, on the device."""
    from transformers import default_data_collator

    data = dataset(ctx.settings, int(model.config.vocab_size))
    batch = default_data_collator([data[i] for i in range(len(data))])
    return {k: v.to(ctx.device) for k, v in batch.items()}


def _autocast(ctx: Context):
    return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)


def _plain_backward(ctx: Context, model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    with _autocast(ctx):
        loss = model(**kwargs).loss
    loss.backward()


def clipped_step_matches_torch(ctx: Context, check: ExactnessCheck) -> CheckOutcome:
    """One clipped step under bf16 autocast against a plain backward + clip_grad_norm_ + torch's optimizer."""
    reference = ctx.source.fresh()
    # the norm of the first step, so the clipping threshold engages whatever the model
    _plain_backward(ctx, reference, first_batch(ctx, reference))
    params = list(reference.parameters())
    probe_norm = _total_norm(params)
    for p in params:
        p.grad = None
    clip = probe_norm / 2

    model = ctx.source.fresh()
    captured: dict[str, Any] = {}

    def capture(module, args, kwargs):
        if not captured:
            captured.update({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = model.register_forward_pre_hook(capture, with_kwargs=True)
    trainer = build_trainer(
        ctx, trainer=OPTITRAINER, optim=check.name, model=model, lr=check.lr, steps=1, max_grad_norm=clip
    )
    trainer.train()
    handle.remove()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    del trainer

    _plain_backward(ctx, reference, captured)
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if check.reference == "sgd":
        step = torch.optim.SGD(params, lr=check.lr)
    else:  # the trainer's AdamW defaults: betas (0.9, 0.999), eps 1e-8; no weight decay
        step = torch.optim.AdamW(params, lr=check.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    step.step()
    whole, worst, worst_name = _update_difference(ctx, model, reference)

    findings = [Finding(norm > clip, f"clipping engaged (norm {norm:.4g} > {clip:.4g})")]
    if not logged or logged[0] is None:
        findings.append(Finding(False, "no grad_norm logged"))
    else:
        rel = abs(logged[0] - norm) / norm
        findings.append(
            Finding(rel <= NORM_RTOL, f"logged grad_norm = plain backward's (rel. diff {rel:.1e})")
        )
    ref_name = "SGD" if check.reference == "sgd" else "AdamW"
    findings.append(
        Finding(
            whole <= UPDATE_RTOL and worst <= TENSOR_RTOL,
            f"update = torch {ref_name} on the clipped plain gradients (rel. diff {whole:.1e}"
            + (f", worst tensor {worst:.1e}: {worst_name})" if worst > 0 else ")"),
        )
    )
    details = {"clip": clip, "reference_norm": norm, "logged_grad_norm": logged[:1], "lr": check.lr}
    details.update({"update_rel_diff": whole, "worst_tensor_rel_diff": worst, "worst_tensor": worst_name})
    return CheckOutcome(findings, details)


@torch.no_grad()
def _total_norm(params: list[torch.Tensor]) -> float:
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


@torch.no_grad()
def _update_difference(
    ctx: Context, model: torch.nn.Module, reference: torch.nn.Module
) -> tuple[float, float, str]:
    """|update - reference update| / |reference update|: over the whole model, and the worst tensor."""
    diff_sq = ref_sq = 0.0
    worst, worst_name = 0.0, ""
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        q = theirs[name].float()
        start = ctx.source.initial(name).to(ctx.device, torch.float32)
        d = float(torch.linalg.vector_norm(p.float() - q))
        u = float(torch.linalg.vector_norm(q - start))
        diff_sq, ref_sq = diff_sq + d * d, ref_sq + u * u
        rel = d / u if u > 0 else (0.0 if d == 0 else math.inf)
        if rel > worst:
            worst, worst_name = rel, name
    return (math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.inf), worst, worst_name


def adalomo_matches_upstream(ctx: Context, check: ExactnessCheck) -> CheckOutcome:
    """optitrainer's AdaLomo and lomo-optim's, two clipped steps on two bf16 copies of the model."""
    from lomo_optim import AdaLomo as UpstreamAdaLomo
    from optitrainer_lomo.optim import AdaLomo

    theirs = ctx.source.fresh(torch.bfloat16, attn_implementation="eager")
    ours = ctx.source.fresh(torch.bfloat16, attn_implementation="eager")
    batch = first_batch(ctx, ours)
    upstream = UpstreamAdaLomo(theirs, lr=check.lr, clip_grad_norm=ADALOMO_CLIP, weight_decay=0.0)
    mine = AdaLomo([{"params": list(ours.parameters()), "weight_decay": 0.0}], lr=check.lr, model=ours)
    findings = []
    for step, lr in enumerate((check.lr, check.lr / 2), start=1):
        loss = theirs(**batch).loss
        upstream.grad_norm(loss)
        their_norm = float(torch.norm(upstream.grad_norms, 2.0))
        upstream.fused_backward(loss, lr)
        our_norm = mine.fused_backward(ours(**batch).loss, lr, max_grad_norm=ADALOMO_CLIP)
        rel = abs(our_norm - their_norm) / their_norm
        findings.append(
            Finding(rel <= ADALOMO_NORM_RTOL, f"step {step} norm {our_norm:.4g} (rel. diff {rel:.1e})")
        )
    differing, beyond_ulp, total = _bf16_differences(theirs, ours)
    share = differing / total
    findings.append(
        Finding(
            beyond_ulp == 0 and share <= DIFFERING_MAX,
            "weights bit-identical"
            if differing == 0
            else f"{differing:,} of {total:,} weights differ ({share:.1e}), {beyond_ulp:,} by more than 1 bf16 ulp",
        )
    )
    stats = _statistics_difference(upstream, theirs, mine, ours)
    findings.append(Finding(stats <= ADALOMO_STATS_RTOL, f"second moments rel. diff {stats:.1e}"))
    details = {"differing": differing, "beyond_one_ulp": beyond_ulp, "total": total, "stats_rel_diff": stats}
    return CheckOutcome(findings, details)


@torch.no_grad()
def _bf16_differences(a: torch.nn.Module, b: torch.nn.Module) -> tuple[int, int, int]:
    """How many weights differ at all, how many by more than one bfloat16 ulp, and how many there are."""
    differing = beyond = total = 0
    for p, q in zip(a.parameters(), b.parameters()):
        x, y = p.float(), q.float()
        gap = (x - y).abs()
        _, exponent = torch.frexp(torch.maximum(x.abs(), y.abs()))
        ulp = torch.ldexp(torch.ones_like(gap), exponent - 8)  # bfloat16: 8 significant bits
        differing += int((gap > 0).sum())
        beyond += int((gap > ulp).sum())
        total += p.numel()
    return differing, beyond, total


@torch.no_grad()
def _statistics_difference(upstream: Any, theirs: torch.nn.Module, mine: Any, ours: torch.nn.Module) -> float:
    """Largest relative difference between upstream's second-moment statistics and ours."""
    worst = 0.0
    for (name, _), p in zip(theirs.named_parameters(), ours.parameters()):
        state = mine.state[p]
        pairs = (
            [
                (upstream.exp_avg_sq_row[name], state["exp_avg_sq_row"]),
                (upstream.exp_avg_sq_col[name], state["exp_avg_sq_col"]),
            ]
            if p.dim() > 1
            else [(upstream.exp_avg_sq[name], state["exp_avg_sq"])]
        )
        for x, y in pairs:
            scale = float(x.abs().max())
            if scale > 0:
                worst = max(worst, float((x - y.to(x.device)).abs().max()) / scale)
    return worst
