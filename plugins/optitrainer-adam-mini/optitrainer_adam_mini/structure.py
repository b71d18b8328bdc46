"""What Adam-mini needs to know about the model, read from the model itself (no torch import).

Adam-mini gives one second-moment value (one learning rate) to each *block* of a weight and finds the
blocks by parameter name. Its dispatch (``adam_mini==1.1.1``, ``Adam_mini.step``), mirrored by
:func:`block_kind` so that the checks here see exactly what the optimizer will do:

1. a name containing ``bias``: plain Adam (one value per element);
2. query/key (``q_proj``, ``k_proj``, ``wq``, ``wk``, ``query``, ``key``): one value per attention head,
   i.e. per ``head_dim x hidden_size`` elements;
3. embedding, output, value, attention output and MLP weights: one value per row (per token, per
   output neuron);
4. anything else (norms): one value for the whole tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# upstream's name lists (Adam_mini.__init__, 1.1.1); the factory checks the built optimizer holds these
ADAM_BLOCK_NAMES = frozenset({"bias"})
WQK_NAMES = frozenset({"k_proj", "q_proj", "wq", "wk", "query", "key"})
ROW_NAMES = {
    "embd": frozenset({"embed", "embd", "wte"}),
    "output": frozenset({"lm_head", "output", "final_layer"}),
    "wv": frozenset({"v_proj", "wv", "value"}),
    "mlp": frozenset({"feed_forward", "linear", "mlp"}),
    "attn_proj": frozenset({"o_proj", "wo", "attn.proj"}),
}

#: the four partitions, as :func:`block_kind` names them
KINDS = ("adam", "head", "row", "tensor")


def block_kind(name: str) -> str:
    """The partition Adam-mini puts a parameter in: ``adam``, ``head``, ``row`` or ``tensor``."""
    name = name.lower()  # upstream lower-cases the names before matching
    if any(k in name for k in ADAM_BLOCK_NAMES):
        return "adam"
    if any(k in name for k in WQK_NAMES):
        return "head"
    if any(k in name for names in ROW_NAMES.values() for k in names):
        return "row"
    return "tensor"


@dataclass(frozen=True)
class Structure:
    """The attention geometry Adam-mini's per-head blocks need."""

    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def head_numel(self) -> int:
        """Elements of one head of a query/key weight (``head_dim`` rows of ``hidden_size``)."""
        return self.head_dim * self.hidden_size


def _config_value(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def read_structure(model: Any, options: Mapping[str, Any]) -> tuple[Structure | None, list[str]]:
    """The structure from ``optim_args`` overrides, else from ``model.config``; or the problems."""
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()  # multimodal models: the language model's config
    hidden = options.get("dim") or _config_value(config, "hidden_size")
    heads = options.get("n_heads") or _config_value(config, "num_attention_heads")
    missing = [
        f"{key} (optim_args '{opt}')"
        for key, opt, value in (("hidden_size", "dim", hidden), ("num_attention_heads", "n_heads", heads))
        if value is None
    ]
    if missing:
        where = f"model.config ({type(config).__name__})" if config is not None else "the model (no .config)"
        return None, [
            f"Adam-mini needs the model's attention structure to give query/key weights one learning rate "
            f"per head, and {where} has no {' and no '.join(missing)}. Llama-style configs name them "
            "hidden_size, num_attention_heads, num_key_value_heads and head_dim; otherwise pass them: "
            "optim_args='dim=<hidden size>, n_heads=<attention heads>, n_kv_heads=<key/value heads>'"
        ]
    kv_heads = options.get("n_kv_heads") or _config_value(config, "num_key_value_heads") or heads
    problems = []
    if heads % kv_heads:
        problems.append(
            f"Adam-mini: {heads} attention heads are not a multiple of {kv_heads} key/value heads; "
            "fix optim_args 'n_heads'/'n_kv_heads'"
        )
    head_dim = options.get("head_dim") or _config_value(config, "head_dim")
    if head_dim is None:
        if hidden % heads:
            problems.append(
                f"Adam-mini: hidden size {hidden} is not a multiple of {heads} heads and the config gives "
                "no head_dim; pass optim_args='head_dim=<size of one head>'"
            )
        head_dim = hidden // heads
    structure = Structure(int(hidden), int(heads), int(kv_heads), int(head_dim))
    return (None if problems else structure), problems


def partition_problems(
    structure: Structure, named_shapes: Iterable[tuple[str, tuple[int, ...]]]
) -> list[str]:
    """Parameters Adam-mini would crash on or split wrongly, each named with the fix."""
    problems: list[str] = []
    heads_found = 0
    for name, shape in named_shapes:
        kind = block_kind(name)
        numel = 1
        for n in shape:
            numel *= n
        if kind == "head":
            heads_found += 1
            if numel % structure.head_numel:
                problems.append(
                    f"Adam-mini: {name} {tuple(shape)} is matched as a query/key weight (its name contains "
                    f"one of {sorted(WQK_NAMES)}) but is not a whole number of heads of head_dim x hidden = "
                    f"{structure.head_dim} x {structure.hidden_size}; check optim_args 'dim'/'head_dim', or "
                    "freeze it (adapters such as LoRA are not supported)"
                )
        elif kind == "row" and len(shape) != 2:
            problems.append(
                f"Adam-mini: {name} {tuple(shape)} is matched as a matrix with one learning rate per row "
                "but is not 2-D; Adam-mini 1.1.1 cannot step it (freeze it or use another optimizer)"
            )
    if not heads_found:
        problems.append(
            "Adam-mini found no query/key weight in this model: it finds attention heads by parameter name "
            f"(one of {sorted(WQK_NAMES)}), so every weight here would get one learning rate for the whole "
            "tensor, which upstream warns can make training unstable. Use a model with Llama-style names "
            "(q_proj, k_proj, …) or another optimizer (e.g. optim='adamw_torch')"
        )
    return problems


def single_rate_matrices(named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> list[str]:
    """Weights of 2 or more dimensions that get one learning rate for the whole tensor."""
    return [name for name, shape in named_shapes if len(shape) >= 2 and block_kind(name) == "tensor"]
