"""The models the benchmark trains: ``tiny``, ``100m``, or a local config / checkpoint. Nothing is downloaded."""

from __future__ import annotations

import os
from typing import Any

import torch

#: a Llama of about 100M parameters (97.6M: 12 layers, hidden 768, MLP 2048, vocabulary 8192, untied head)
LLAMA_100M = {
    "vocab_size": 8192,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

#: a Llama of 26.4M parameters in 75 tensors (8 layers, hidden 512, MLP 1376, vocabulary 1024, untied):
#: many mid-sized tensors, where per-tensor communication and per-tensor optimizer steps show
LLAMA_8X512 = {
    "vocab_size": 1024,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

PRESETS = ("tiny", "100m", "8x512")


def build_model(spec: str, seed: int = 0, dtype: str = "float32") -> torch.nn.Module:
    """A causal LM for ``spec``: ``tiny``, ``100m``, a ``config.json`` path, or a local checkpoint dir.

    A directory with weights is loaded with ``from_pretrained`` (local files only); a config alone
    is initialised from ``seed``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    if spec == "tiny":
        from ..testing import tiny_llama_config

        model = LlamaForCausalLM(tiny_llama_config())
    elif spec == "100m":
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_100M))
    elif spec == "8x512":
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_8X512))
    elif os.path.isdir(spec) and _has_weights(spec):
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, dtype=torch_dtype)
    elif os.path.exists(spec):
        config = AutoConfig.from_pretrained(spec, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config)
    else:
        raise ValueError(
            f"--model {spec!r}: expected one of {', '.join(PRESETS)}, a config.json, or a local checkpoint "
            "directory (nothing is downloaded)"
        )
    return model.to(torch_dtype)


def _has_weights(path: str) -> bool:
    return any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))


def vocab_size(model: torch.nn.Module) -> int:
    return int(model.config.vocab_size)


def max_positions(model: torch.nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def describe(model: torch.nn.Module, spec: str) -> dict[str, Any]:
    cfg = model.config
    return {
        "spec": spec,
        "architecture": type(model).__name__,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
