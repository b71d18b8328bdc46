"""Optimizer state of ``badam`` against ``adamw_torch`` on a Llama, after one step, as the trainer builds them.

    python plugins/optitrainer-badam/memory.py [--layers 8] [--hidden 256] [--vocab 32000]

Counts the bytes of the tensors in ``optimizer.state_dict()["state"]`` (exp_avg, exp_avg_sq and the step
counters) and, for BAdam, the fp32 master copies of the active block (none for fp32 weights).
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def state_bytes(state_dict: dict) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in state_dict["state"].values()
        for t in s.values()
        if torch.is_tensor(t)
    )


def measure(layers: int = 8, hidden: int = 256, vocab: int = 32000) -> dict[str, float]:
    from optitrainer import OptiTrainer
    from optitrainer.testing import SyntheticLMDataset, tiny_llama, training_arguments

    out: dict[str, float] = {}
    for optim in ("adamw_torch", "badam"):
        model = tiny_llama(
            num_hidden_layers=layers,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            vocab_size=vocab,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        with tempfile.TemporaryDirectory() as tmp:
            args = training_arguments(tmp, optim=optim)
            trainer = OptiTrainer(model=model, args=args, train_dataset=SyntheticLMDataset(n=8))
            optimizer = trainer.create_optimizer()
            for p in model.parameters():
                p.grad = torch.ones_like(p) if p.requires_grad else None
            optimizer.step()
            out[f"{optim}_state_bytes"] = state_bytes(optimizer.state_dict())
            if optim == "badam":
                masters = [
                    h
                    for lp, h in zip(optimizer.param_idx2lp.values(), optimizer.param_idx2hp.values())
                    if h is not lp
                ]
                out["badam_master_bytes"] = sum(h.numel() * h.element_size() for h in masters)
                out["badam_block_params"] = sum(p.numel() for p in optimizer.param_idx2lp.values())
                optimizer.restore_requires_grad()
        out["model_params"] = sum(p.numel() for p in model.parameters())
    out["ratio"] = out["badam_state_bytes"] / out["adamw_torch_state_bytes"]
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    a = parser.parse_args()
    r = measure(a.layers, a.hidden, a.vocab)
    mib = 2**20
    print(
        f"Llama: {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}: {r['model_params'] / 1e6:.2f} M parameters"
    )
    print(f"adamw_torch optimizer state: {r['adamw_torch_state_bytes'] / mib:.2f} MiB")
    print(
        f"badam optimizer state:       {r['badam_state_bytes'] / mib:.2f} MiB "
        f"({100 * r['ratio']:.1f} % of AdamW; one decoder layer = {r['badam_block_params'] / 1e6:.3f} M parameters), "
        f"fp32 master copies: {r['badam_master_bytes'] / mib:.2f} MiB"
    )
