"""What the GPU check runs, in which order, and with which settings (on a GPU and in the dry run)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .. import memory

OPTITRAINER, TRANSFORMERS = "optitrainer", "transformers"

#: the 1.1B Llama (22 layers, hidden 2048, vocabulary 32000) of ``make bench-gpu``
LLAMA_1B = "examples/bench/llama-1b.json"

#: rate of the adaptive optimizers (AdamW and kin): every weight moves by about this much per step, which
#: lowers the loss of a fixed batch within a few steps on the tiny and the 1.1B model alike
ADAPTIVE_LR = 3e-4
#: LOMO is SGD: its step is lr x gradient, so it needs a larger rate than the adaptive ones
SGD_LR = 1e-2
#: AdaLomo scales its (RMS-clipped) update by each weight's RMS: 1e-2 moves a 0.02-RMS weight by 2e-4
ADALOMO_LR = 1e-2

#: GaLore projects through an SVD of each target gradient at its first step (one matrix at a time, about a
#: second each for the 1.1B model's 2048 x 5632 matrices on a GPU; eight GaLore runs x 154 matrices would
#: take the whole budget), so GaLore targets the attention and MLP projections of the first two layers
#: (14 matrices). APOLLO's random projection costs nothing comparable: it targets every linear layer.
GALORE_TARGETS = (r".*layers\.[01]\.self_attn\..*", r".*layers\.[01]\.mlp\..*")
ALL_LINEAR = "all-linear"

#: state checks a row may ask for (see :mod:`.verify`)
EIGHT_BIT, PAGED = "8-bit states", "paged states"


@dataclass(frozen=True)
class Settings:
    """How every run of one check is set up."""

    dry_run: bool
    device: str  # "cuda" or "cpu"
    model: str  # a preset of optitrainer.bench.models or a config.json
    batch_size: int
    seq_len: int
    warmup_steps: int  # left out of the median step time
    timed_steps: int
    low_rank: int | None  # rank= for GaLore/APOLLO; None: their default (128)
    row_limit_s: float  # one row may take this long before it is stopped
    min_slot_s: float  # no row starts with less time left than this (or than a typical row took)
    threads: int | None = None  # torch threads (the dry run keeps to one: the tiny model is faster so)
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    @property
    def precision(self) -> str:
        return "bf16 autocast, float32 weights (bf16=True)"


def gpu_settings() -> Settings:
    """The lent GPU: the 1.1B Llama, batch 4 x 512 tokens, 2 warm-up + 5 timed steps per run."""
    return Settings(
        dry_run=False,
        device="cuda",
        model=_repo_path(LLAMA_1B),
        batch_size=4,
        seq_len=512,
        warmup_steps=2,
        timed_steps=5,
        low_rank=None,
        row_limit_s=120.0,
        min_slot_s=10.0,
    )


def dry_run_settings() -> Settings:
    """The same runs on the CPU with the tiny Llama (rank 8: the default 128 exceeds its 32-wide matrices)."""
    return Settings(
        dry_run=True,
        device="cpu",
        model="tiny",
        batch_size=4,
        seq_len=32,
        warmup_steps=2,
        timed_steps=5,
        low_rank=8,
        row_limit_s=60.0,
        min_slot_s=1.0,
        threads=1,
    )


def _repo_path(relative: str) -> str:
    """``relative`` from the working directory, else from the repository this package lives in."""
    if Path(relative).exists():
        return relative
    in_repo = Path(__file__).resolve().parents[3] / relative
    return str(in_repo) if in_repo.exists() else relative


@dataclass(frozen=True)
class Contender:
    """An optimizer of the seed guide, as the check trains it."""

    name: str
    lr: float = ADAPTIVE_LR
    cuda_only: bool = False  # bitsandbytes' kernels: what the row checks exists on CUDA only
    targets: tuple[str, ...] | str | None = None  # optim_target_modules (GaLore, APOLLO)
    expects: tuple[str, ...] = ()  # state checks on top of "the loss fell"
    baseline_cuda_only: bool = False  # transformers' build of it needs CUDA (upstream AdaLomo's .cuda())


@dataclass(frozen=True)
class ExactnessCheck:
    """A row that compares an optimizer's update with a reference computed another way (:mod:`.exactness`)."""

    name: str  # the optimizer checked
    label: str  # the row's "trainer" column
    reference: str  # "sgd" / "adamw": torch's optimizer on a plain backward; "lomo-optim": upstream AdaLomo
    lr: float
    cuda_only: bool = False


CONTENDERS: tuple[Contender, ...] = (
    Contender("adamw_torch"),
    Contender("adamw_torch_fused"),
    Contender("adamw_torch_layerwise"),
    Contender("lomo", lr=SGD_LR),
    Contender("adalomo", lr=ADALOMO_LR, baseline_cuda_only=True),
    Contender("adamw_bnb_8bit", cuda_only=True, expects=(EIGHT_BIT,)),
    Contender("paged_adamw_8bit", cuda_only=True, expects=(EIGHT_BIT, PAGED)),
    Contender("adamw_bnb_8bit_layerwise", cuda_only=True, expects=(EIGHT_BIT,)),
    Contender("paged_adamw_8bit_layerwise", cuda_only=True, expects=(EIGHT_BIT, PAGED)),
    Contender("adafactor"),
    Contender("schedule_free_adamw"),
    Contender("grokadamw"),
    Contender("stable_adamw"),
    Contender("apollo_adamw", targets=ALL_LINEAR),
    Contender("apollo_adamw_layerwise", targets=ALL_LINEAR),
    Contender("galore_adamw", targets=GALORE_TARGETS),
    Contender("galore_adamw_layerwise", targets=GALORE_TARGETS),
    Contender("galore_adamw_8bit", cuda_only=True, targets=GALORE_TARGETS, expects=(EIGHT_BIT,)),
    Contender("galore_adamw_8bit_layerwise", cuda_only=True, targets=GALORE_TARGETS, expects=(EIGHT_BIT,)),
)

#: run right after the optimizer's own rows; the rates make the step large next to float32's rounding
CHECKS: tuple[ExactnessCheck, ...] = (
    ExactnessCheck("adamw_torch_fused", "check: = torch AdamW", "adamw", lr=1e-3),
    ExactnessCheck("adamw_torch_layerwise", "check: exact clipping", "adamw", lr=1e-3),
    ExactnessCheck("lomo", "check: exact clipping", "sgd", lr=0.1),
    ExactnessCheck("adalomo", "check: = lomo-optim", "lomo-optim", lr=ADALOMO_LR, cuda_only=True),
)


@dataclass(frozen=True)
class Job:
    """One row of the table: a training run under one trainer, or an exactness check."""

    optim: str  # optitrainer's name
    trainer: str  # OPTITRAINER, TRANSFORMERS, or the check's label
    cuda_only: bool
    judged: bool  # decides the exit code (transformers' baselines are reported, not judged)
    contender: Contender | None = None
    check: ExactnessCheck | None = None
    trainer_optim: str | None = None  # the name the trainer gets (transformers' own for the baseline)
    grad_rule: str = memory.GRADS_ALL  # the gradients the method needs alive at once (the floor)
    target_modules: tuple[str, ...] | str | None = None
    optim_args: str | None = None


def plan(settings: Settings, only: set[str] | None = None) -> list[Job]:
    """Every row, in the order they run: each optimizer, its transformers baseline, then its check.

    Resolves every name first, so a name no plugin provides fails before anything is built.
    """
    from ...registry import REGISTRY
    from .. import transformers_name

    if only is not None:
        unknown = only - {c.name for c in CONTENDERS}
        if unknown:
            raise ValueError(
                f"--only: {', '.join(sorted(unknown))} not checked here; choose from "
                + ", ".join(c.name for c in CONTENDERS)
            )
    checks = {c.name: c for c in CHECKS}
    jobs: list[Job] = []
    for contender in CONTENDERS:
        if only is not None and contender.name not in only:
            continue
        resolved = REGISTRY.resolve(contender.name, check_installed=False)
        caps = resolved.spec.capabilities
        one_gradient = resolved.layerwise or caps.owns_backward
        run = Job(
            optim=resolved.name,
            trainer=OPTITRAINER,
            cuda_only=contender.cuda_only or caps.requires_cuda,
            judged=True,
            contender=contender,
            trainer_optim=resolved.name,
            grad_rule=memory.GRADS_LARGEST if one_gradient else memory.GRADS_ALL,
            target_modules=contender.targets if caps.needs_target_modules else None,
            optim_args=f"rank={settings.low_rank}" if contender.targets and settings.low_rank else None,
        )
        jobs.append(run)
        hf_name = transformers_name(resolved)
        if hf_name is not None:
            jobs.append(
                replace(
                    run,
                    trainer=TRANSFORMERS,
                    trainer_optim=hf_name,
                    judged=False,
                    cuda_only=run.cuda_only or contender.baseline_cuda_only,
                )
            )
        check = checks.get(contender.name)
        if check is not None:
            jobs.append(
                Job(
                    optim=resolved.name,
                    trainer=check.label,
                    cuda_only=check.cuda_only,
                    judged=True,
                    check=check,
                )
            )
    return jobs


def checked_names() -> list[str]:
    """Every optimizer name the check trains (its own and the exactness checks' references excluded)."""
    return [c.name for c in CONTENDERS]
