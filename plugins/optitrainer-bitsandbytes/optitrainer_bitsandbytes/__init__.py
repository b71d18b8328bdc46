"""optitrainer plugin for bitsandbytes: 8-bit, 32-bit and paged AdamW, AdEMAMix, Lion and RMSprop.

The names are transformers' own (``adamw_bnb_8bit``, ``paged_adamw_8bit``, ``ademamix_8bit``,
``lion_8bit``, ``rmsprop_bnb_8bit``…), built with the classes, keyword arguments and embedding rule of
``transformers.Trainer`` (every ``nn.Embedding`` keeps 32-bit states under the 8-bit names), so the
numbers are transformers' bit for bit. Every name also runs as ``<name>_layerwise``: bitsandbytes keeps
each parameter's state (8-bit blocks of 256 elements and their absmax included) apart from the others'.

This module imports neither torch nor bitsandbytes: ``optitrainer list`` loads it.
"""

from __future__ import annotations

from optitrainer.plugin import BuildContext, Capabilities, OptimizerSpec, Option

__all__ = [
    "ADAMW_BNB_8BIT",
    "PAGED_ADAMW_32BIT",
    "PAGED_ADAMW_8BIT",
    "ADEMAMIX",
    "ADEMAMIX_8BIT",
    "PAGED_ADEMAMIX_32BIT",
    "PAGED_ADEMAMIX_8BIT",
    "LION_32BIT",
    "LION_8BIT",
    "PAGED_LION_32BIT",
    "PAGED_LION_8BIT",
    "RMSPROP_BNB",
    "RMSPROP_BNB_8BIT",
    "SPECS",
]

REQUIRES = ("bitsandbytes==0.50.2",)
IMPORTS = ("bitsandbytes",)

CAPABILITIES = Capabilities(
    layerwise=True,
    distributed=frozenset({"ddp"}),
    distributed_note=(
        "bitsandbytes quantizes each whole parameter's state in blocks of 256 elements and picks 32-bit "
        "states per parameter (embeddings, tensors under min_8bit_size); ZeRO's flattened partitions and "
        "FSDP's shards regroup those blocks and hide which parameter a slice belongs to, so the update is "
        "not the same; DDP only (whole parameters and the averaged gradient on every rank)"
    ),
)

# --- options ---------------------------------------------------------------------------------------

MIN_8BIT_SIZE = Option(
    "min_8bit_size",
    int,
    4096,
    "parameters with fewer elements keep 32-bit states (bitsandbytes' default, which transformers keeps)",
    low=0,
)
EMBEDDINGS_32BIT = Option(
    "embeddings_32bit",
    bool,
    True,
    "keep the weight of every nn.Embedding in 32-bit states, as transformers.Trainer does (bitsandbytes "
    "recommends 32-bit embedding states for stable training); False: 8-bit like the other weights",
)
EIGHT_BIT = (MIN_8BIT_SIZE, EMBEDDINGS_32BIT)

#: bitsandbytes refuses a beta outside [0, 1)
BETA = {"low": 0.0, "high": 1.0, "high_exclusive": True}

ADEMAMIX_OPTIONS = (
    Option("beta1", float, None, "fast EMA coefficient; None: adam_beta1", **BETA),
    Option("beta2", float, None, "second-moment EMA coefficient; None: adam_beta2", **BETA),
    Option("beta3", float, 0.9999, "slow EMA coefficient", **BETA),
    Option("alpha", float, 5.0, "weight of the slow EMA in the update", low=0.0),
    Option("eps", float, None, "added to the denominator; None: adam_epsilon", low=0.0),
    Option("t_alpha", int, None, "steps over which alpha warms up linearly from 0; None: no warmup", low=1),
    Option(
        "t_beta3",
        int,
        None,
        "steps over which beta3 warms up from beta1 (the paper's schedule); None: no warmup",
        low=1,
    ),
)
RMSPROP_OPTIONS = (
    # bitsandbytes has no alpha=0 form (NotImplementedError) and refuses alpha >= 1 as a beta
    Option("alpha", float, 0.99, "decay of the squared-gradient average", low_exclusive=True, **BETA),
    Option(
        "eps",
        float,
        1e-8,
        "added to the denominator (transformers passes no eps here: adam_epsilon is not used)",
        low=0.0,
    ),
    Option("momentum", float, 0.0, "momentum of the update", **BETA),
)

# --- building and checking -------------------------------------------------------------------------


def _factory(family: str, optim_bits: int, is_paged: bool):
    def factory(ctx: BuildContext):
        from ._optim import build

        return build(ctx, family, optim_bits, is_paged)

    return factory


def _validate(family: str, name: str):
    """Checks of values that come from the training arguments (optim_args are bounded by their Option)."""

    def validate_arguments(args, options) -> list[str]:
        problems = []
        keys = ()
        if family in ("adamw", "lion"):
            keys = ("adam_beta1", "adam_beta2")
        elif family == "ademamix":  # beta1/beta2 fall back to the arguments only when not in optim_args
            keys = tuple(f"adam_{k}" for k in ("beta1", "beta2") if options[k] is None)
        # getattr with a default: a validator never raises, also on argument objects lacking a field
        for key in keys:
            value = getattr(args, key, None)
            if value is not None and not 0.0 <= value < 1.0:
                fix = f"set {key} inside [0, 1)"
                if family == "ademamix":
                    fix += f" or optim_args='{key[5:]}=0.9'"
                problems.append(f"{key}={value!r}: {name} needs 0 <= {key} < 1; {fix}")
        uses_eps = family == "adamw" or (family == "ademamix" and options["eps"] is None)
        eps = getattr(args, "adam_epsilon", None)
        if uses_eps and eps is not None and eps < 0:
            problems.append(f"adam_epsilon={eps!r}: {name} needs eps >= 0; set adam_epsilon >= 0")
        if family == "ademamix" and options["t_beta3"] is not None:
            beta1 = getattr(args, "adam_beta1", 0.9) if options["beta1"] is None else options["beta1"]
            if beta1 <= 0.0 or options["beta3"] <= 0.0:
                problems.append(
                    f"optim_args t_beta3={options['t_beta3']}: {name}'s beta3 warmup interpolates log(beta1) "
                    "and log(beta3), which needs beta1 > 0 and beta3 > 0; raise them or drop t_beta3"
                )
        return problems

    return validate_arguments


# --- the specs -------------------------------------------------------------------------------------

_FAMILY = {
    "adamw": (
        "AdamW",
        "betas (adam_beta1, adam_beta2) and eps (adam_epsilon) from the training arguments",
        (),
    ),
    "ademamix": (
        "AdEMAMix",
        "a mixture of a fast and a slow gradient EMA (Pagliardini et al. 2024); beta1, beta2, eps default to "
        "adam_beta1, adam_beta2, adam_epsilon and may be set in optim_args (transformers' keys)",
        ADEMAMIX_OPTIONS,
    ),
    "lion": (
        "Lion",
        "sign-of-momentum updates, one state tensor; betas from adam_beta1/adam_beta2 (the paper uses "
        "(0.9, 0.99): set adam_beta2=0.99); use a 3-10x smaller learning rate than AdamW",
        (),
    ),
    "rmsprop": (
        "RMSprop",
        "alpha, eps and momentum from optim_args (transformers hands these strings to bitsandbytes untyped)",
        RMSPROP_OPTIONS,
    ),
}

_PAGED_DOC = (
    " Paged: on CUDA, states of tensors with at least 100,000 elements live in unified memory that pages "
    "to CPU RAM under GPU memory pressure. On CPU, bitsandbytes warns and uses ordinary buffers: the same "
    "numbers as the unpaged form."
)
_8BIT_DOC = (
    " 8-bit: each state is stored as uint8 codes with one float32 absmax per block of 256 elements "
    "(blockwise dynamic quantization); parameters under min_8bit_size elements and, as in "
    "transformers.Trainer, nn.Embedding weights keep 32-bit states."
)


def _spec(name: str, family: str, optim_bits: int, is_paged: bool, aliases: tuple[str, ...] = ()):
    cls, about, options = _FAMILY[family]
    form = ("paged " if is_paged else "") + f"{optim_bits}-bit"
    return OptimizerSpec(
        name=name,
        factory=_factory(family, optim_bits, is_paged),
        summary=f"bitsandbytes {cls}, {form} states (as transformers.Trainer builds it)",
        requires=REQUIRES,
        imports=IMPORTS,
        options=(*options, *(EIGHT_BIT if optim_bits == 8 else ())),
        aliases=aliases,
        capabilities=CAPABILITIES,
        transformers_name=name,
        validate_arguments=_validate(family, name),
        docs=(
            f"`bitsandbytes.optim.{cls}(optim_bits={optim_bits}"
            + ("" if family == "rmsprop" else f", is_paged={is_paged}")
            + f")`: {about}. learning_rate (and its schedule) and weight_decay (not on biases and norms) "
            "come from the training arguments."
            + (_8BIT_DOC if optim_bits == 8 else "")
            + (_PAGED_DOC if is_paged else "")
            + f" `{name}_layerwise` runs one optimizer per parameter from a gradient hook (same numbers)."
        ),
    )


ADAMW_BNB_8BIT = _spec("adamw_bnb_8bit", "adamw", 8, False, aliases=("adamw_8bit",))
PAGED_ADAMW_32BIT = _spec("paged_adamw_32bit", "adamw", 32, True)
PAGED_ADAMW_8BIT = _spec("paged_adamw_8bit", "adamw", 8, True)
ADEMAMIX = _spec("ademamix", "ademamix", 32, False)
ADEMAMIX_8BIT = _spec("ademamix_8bit", "ademamix", 8, False)
PAGED_ADEMAMIX_32BIT = _spec("paged_ademamix_32bit", "ademamix", 32, True)
PAGED_ADEMAMIX_8BIT = _spec("paged_ademamix_8bit", "ademamix", 8, True)
LION_32BIT = _spec("lion_32bit", "lion", 32, False)
LION_8BIT = _spec("lion_8bit", "lion", 8, False)
PAGED_LION_32BIT = _spec("paged_lion_32bit", "lion", 32, True)
PAGED_LION_8BIT = _spec("paged_lion_8bit", "lion", 8, True)
RMSPROP_BNB = _spec("rmsprop_bnb", "rmsprop", 32, False, aliases=("rmsprop_bnb_32bit",))
RMSPROP_BNB_8BIT = _spec("rmsprop_bnb_8bit", "rmsprop", 8, False)

#: every spec of this distribution (the entry points name each one)
SPECS = (
    ADAMW_BNB_8BIT,
    PAGED_ADAMW_32BIT,
    PAGED_ADAMW_8BIT,
    ADEMAMIX,
    ADEMAMIX_8BIT,
    PAGED_ADEMAMIX_32BIT,
    PAGED_ADEMAMIX_8BIT,
    LION_32BIT,
    LION_8BIT,
    PAGED_LION_32BIT,
    PAGED_LION_8BIT,
    RMSPROP_BNB,
    RMSPROP_BNB_8BIT,
)
