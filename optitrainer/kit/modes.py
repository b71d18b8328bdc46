"""``Capabilities.train_eval_modes`` must match the optimizer: declared iff it has ``train()``/``eval()``."""

from __future__ import annotations

#: steps before eval() must move the weights (schedule-free RAdam updates only the state for its first
#: ~5 steps at beta2=0.999, while its rectification is undefined)
MODE_STEPS = 8


def build_optimizer(case, tmp_dir):
    """The trainer, and the optimizer the plugin's factory built for it (before any step)."""
    from ..testing import SyntheticLMDataset, tiny_llama, training_arguments
    from ..trainer import OptiTrainer

    args = training_arguments(tmp_dir, optim=case.optim, **{"lr_scheduler_type": "constant", **case.args})
    trainer = OptiTrainer(model=tiny_llama(), args=args, train_dataset=SyntheticLMDataset())
    trainer.create_optimizer()
    return trainer, trainer._factory_optimizer()


def has_modes(optimizer) -> bool:
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def check_train_eval_modes(case, tmp_dir) -> str:
    from ..registry import REGISTRY
    from ..testing import SyntheticLMDataset, max_param_diff

    spec = REGISTRY.resolve(case.optim, check_installed=False).spec
    declared = spec.capabilities.train_eval_modes
    trainer, optimizer = build_optimizer(case, tmp_dir)
    kind = type(optimizer).__name__
    if not has_modes(optimizer):
        assert not declared, (
            f"{spec.name} declares Capabilities(train_eval_modes=True) but its optimizer ({kind}) has no "
            "train()/eval() methods: remove the flag, or build the optimizer that has them"
        )
        return f"{kind} has no train()/eval(), none declared"
    assert declared, (
        f"{spec.name}: its optimizer ({kind}) has train()/eval() but the spec does not declare "
        "Capabilities(train_eval_modes=True): the trainer would evaluate and save the train-mode weights. "
        "Declare train_eval_modes=True"
    )
    assert "train_mode" in optimizer.param_groups[0], (
        f"{spec.name}: the trainer reads the current mode from param_groups[0]['train_mode'] (the "
        f"schedulefree convention), which {kind} does not set"
    )
    model = trainer.model
    optimizer.train()
    batch = {k: v.unsqueeze(0) for k, v in SyntheticLMDataset(n=1)[0].items()}
    for _ in range(MODE_STEPS):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    train_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.eval()
    moved = max_param_diff(train_weights, {n: p.detach() for n, p in model.named_parameters()})
    assert moved > 0, (
        f"{spec.name}: eval() left the weights unchanged after {MODE_STEPS} steps; train_eval_modes is moot"
    )
    optimizer.train()
    back = max_param_diff(train_weights, {n: p.detach() for n, p in model.named_parameters()})
    assert back <= 1e-6 * max(1.0, float(max(p.abs().max() for p in train_weights.values()))), (
        f"{spec.name}: train() after eval() does not restore the train-mode weights (off by {back:g})"
    )
    return f"eval() moves the weights by {moved:.3g}, train() restores them ({back:.2g})"


__all__ = ["build_optimizer", "check_train_eval_modes", "has_modes"]
