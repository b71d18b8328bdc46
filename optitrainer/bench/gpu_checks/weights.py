"""The check's model: built once, then handed out as fresh copies with the very same initial weights."""

from __future__ import annotations

import copy
import os

import torch


def model_config(spec: str):
    """The config of ``spec``: ``tiny``, ``100m`` (optitrainer.bench.models) or a local config.json / directory."""
    from transformers import AutoConfig, LlamaConfig

    from ...testing import tiny_llama_config
    from ..models import LLAMA_100M

    if spec == "tiny":
        return tiny_llama_config()
    if spec == "100m":
        return LlamaConfig(**LLAMA_100M)
    if os.path.exists(spec):
        return AutoConfig.from_pretrained(spec, local_files_only=True)
    raise ValueError(f"--model {spec!r}: expected tiny, 100m or a local config.json (nothing is downloaded)")


class ModelSource:
    """Builds the model once (seeded, on ``device``) and keeps its initial weights in host memory.

    :meth:`fresh` builds the architecture again and copies those weights in: for the 1.1B Llama a copy
    from pinned memory takes a fraction of a second, where building and initialising it on the CPU takes
    many, so every row starts from the same weights without a rebuild. Nothing of the source stays on
    the device between rows, so it never counts in a row's allocator peak.
    """

    def __init__(self, spec: str, device: torch.device, seed: int = 0):
        self.spec, self.device = spec, device
        self.config = model_config(spec)
        torch.manual_seed(seed)
        model = self._build(torch.float32, None)
        pin = device.type == "cuda"
        self._initial = {name: _host_copy(t, pin) for name, t in model.state_dict().items()}
        self.n_params = sum(p.numel() for p in model.parameters())
        del model

    def _build(self, dtype: torch.dtype, attn_implementation: str | None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        # a copy: from_config writes the attention implementation into the config it is given
        with torch.device(self.device):
            return AutoModelForCausalLM.from_config(copy.deepcopy(self.config), **kwargs)

    def fresh(
        self, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
    ) -> torch.nn.Module:
        """A new model on the device holding the initial weights (cast to ``dtype``)."""
        model = self._build(dtype, attn_implementation)
        model.load_state_dict(self._initial)
        return model

    def initial(self, name: str) -> torch.Tensor:
        """The initial value of parameter ``name`` (float32, in host memory)."""
        return self._initial[name]


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
    out.copy_(t.detach())
    return out
