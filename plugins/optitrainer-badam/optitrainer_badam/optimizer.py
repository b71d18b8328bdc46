"""``BlockOptimizer``: upstream's ``badam.BlockOptimizer`` (1.4), resumable and safe inside a Trainer.

The update, the block inference, the switch order and the switch schedule are upstream's, number for
number (``tests/test_badam.py`` checks it bit for bit against ``badam.BlockOptimizer`` used directly).
What changes, and why:

* **Resume.** Upstream's ``state_dict`` is the base optimizer's, keyed by position in the *active
  block*; it holds neither which block is active, nor the step count that drives the switches, nor
  the random block order, and its ``load_state_dict`` loads that state into whatever block the fresh
  optimizer starts with (same-shaped decoder layers: silently into the wrong layer). The outer
  param groups' learning rate is not restored either, so the first resumed step runs at the
  schedule's first value. Here ``state_dict()`` is torch's layout over *all* parameters (state keyed
  by their index, only the active block's present) plus a ``"badam"`` entry: active block, next
  block, step count, the remaining random order, the state of the generator that draws it, and the
  fp32 master copies of a bf16/fp16 active block (upstream rebuilds them from the rounded weights).
* **Random order from its own generator.** Upstream draws block permutations from torch's global
  RNG, so the order depends on everything else that consumed it (dropout, samplers) and cannot be
  saved. Here a ``torch.Generator`` seeded with ``seed`` draws them (the same permutations as
  upstream after ``torch.manual_seed(seed)`` when nothing else uses the global RNG).
* **The param groups are the caller's.** Upstream rebuilds two groups (no-decay: names containing
  "bias") and then overwrites their ``weight_decay`` with the base optimizer's *default*: norms are
  decayed and the arguments' decay is ignored (with LLaMA-Factory's base AdamW, every group decays at
  torch's default 0.01). Here the active parameters stay in the group they were given in, with that
  group's hyperparameters, and every hyperparameter (not only ``lr``) is copied from the outer group
  the scheduler moves to the base group at each step.
* **No fp32 master copy of fp32 parameters**: it would equal the parameter; the base optimizer
  updates it in place (same numbers, one block less memory). bf16/fp16 parameters get upstream's fp32
  master copy of the active block.
* Parameters of the active block without a gradient are skipped (upstream asserts); ``start_block``
  with ``switch_mode="random"`` works (upstream fails to build); messages go to the
  ``optitrainer.badam`` logger instead of ``print``; ``torch.cuda.empty_cache()`` runs at switches
  only, not after every step, and no ``gc.collect()`` runs at switches (reference counting frees the
  old block's state at once; a full collection took 1.4 s per switch with transformers loaded).
* Only the given (trainable) parameters are ever unfrozen; :meth:`restore_requires_grad` gives them
  back their flags (the plugin's callback calls it when training ends).

Kept from upstream on purpose (numbers identical to LLaMA-Factory runs): the first block trains
``switch_block_every - 1`` steps, the next ones ``switch_block_every``; ``switch_mode="fixed"``
restarts the base optimizer's state at every "switch". DeepSpeed ZeRO-3 (upstream's other path) is
not supported.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from badam import BlockOptimizer as _UpstreamBlockOptimizer

logger = logging.getLogger("optitrainer.badam")

__all__ = ["BlockOptimizer", "SWITCH_MODES", "infer_blocks"]

SWITCH_MODES = ("ascending", "descending", "random", "fixed")
#: the key of the block schedule in :meth:`BlockOptimizer.state_dict`
STATE_KEY = "badam"


def infer_blocks(names: Sequence[str], include_embedding: bool = False, include_lm_head: bool = False):
    """Upstream's automatic blocks: one per decoder layer (``layers.<i>.``), the embedding and the rest
    (head, final norm) as optional blocks."""
    return _UpstreamBlockOptimizer.infer_param_groups(None, list(names), include_embedding, include_lm_head)


class BlockOptimizer(_UpstreamBlockOptimizer):
    """BAdam: ``base_optimizer`` updates one block of parameters; the others are frozen.

    Args:
        base_optimizer: the optimizer over every parameter of ``named_parameters_list`` (its param
            groups are kept: the active parameters are stepped with their group's hyperparameters).
        named_parameters_list: ``(name, parameter)`` of the trainable parameters.
        block_prefix_list: blocks, each a list of name substrings; ``None`` infers one block per decoder
            layer (``include_embedding``/``include_lm_head`` add the embedding and the rest).
        switch_block_every: the active block changes after step ``switch_block_every - 1``, then every
            ``switch_block_every`` optimizer steps (upstream's schedule).
        start_block: index of the first block; ``None``: the first in ``switch_mode``'s order.
        switch_mode: ``"ascending"``, ``"descending"``, ``"random"`` (a new permutation of the blocks
            each round) or ``"fixed"`` (``start_block`` only).
        active_modules: name substrings trained together with every block.
        seed: seeds the generator of the random block order.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        named_parameters_list: Iterable[tuple[str, torch.nn.Parameter]],
        block_prefix_list: list[list[str]] | None = None,
        switch_block_every: int = 50,
        start_block: int | None = None,
        switch_mode: str = "descending",
        active_modules: Sequence[str] = (),
        include_embedding: bool = False,
        include_lm_head: bool = False,
        seed: int = 0,
    ) -> None:
        named = list(named_parameters_list)
        if switch_mode not in SWITCH_MODES:
            raise ValueError(f"switch_mode={switch_mode!r}: use one of {', '.join(SWITCH_MODES)}")
        if int(switch_block_every) < 1:
            raise ValueError(f"switch_block_every={switch_block_every!r}: use an integer >= 1")
        if switch_mode == "fixed" and start_block is None:
            raise ValueError("switch_mode='fixed' trains one block only: give its index as start_block")
        self._building = True  # upstream's __init__ ends with a switch: ours runs once we are set up
        #: the seed of the random block order's generator
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        with warnings.catch_warnings():
            # upstream warns that fp32 weights cost memory; here fp32 weights get no master copy
            warnings.filterwarnings("ignore", message="BAdam expect model")
            super().__init__(
                base_optimizer,
                named,
                block_prefix_list=None if block_prefix_list is None else [list(b) for b in block_prefix_list],
                switch_block_every=int(switch_block_every),
                # upstream draws the random order from the global RNG here: we draw it below
                start_block=0 if switch_mode == "random" and start_block is None else start_block,
                switch_mode=switch_mode,
                active_modules=list(active_modules),
                include_embedding=include_embedding,
                include_lm_head=include_lm_head,
                verbose=0,
            )
        self._building = False
        del self.state_dict  # upstream binds the base optimizer's state_dict on the instance
        problems = block_problems(named, self.block_prefix_list, start_block)
        if problems:
            raise ValueError("; ".join(problems))
        self._group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        missing = [n for n, p in named if id(p) not in self._group_of]
        if missing:
            raise ValueError(
                f"parameters {missing[:3]} are not in the base optimizer's param groups: build the base "
                "optimizer over the same parameters as named_parameters_list"
            )
        self._initial_requires_grad = [p.requires_grad for _, p in named]
        self.block_order: list[int] = []
        if switch_mode == "random" and start_block is None:
            self.block_order = torch.randperm(self.block_num, generator=self._generator).tolist()
            self.current_block_idx = self.block_order.pop()
        #: the index of the block being trained
        self.active_block: int = self.current_block_idx
        #: the block the last step updated (``None`` before the first step)
        self.last_block: int | None = None
        self.switch_trainable_params()

    # -- the block schedule ------------------------------------------------------------------------
    def switch_trainable_params(self, verbose: int | None = None) -> None:
        """Activate the block ``current_block_idx`` points to, then advance it (upstream's order)."""
        if self._building:
            return
        self._activate()
        self._update_active_block_idx()

    def _activate(self) -> None:
        self.active_param_prefixs = self.block_prefix_list[self.current_block_idx] + self.active_modules
        while self.lora_mode:  # upstream: skip blocks without LoRA parameters
            names = [
                n for n, _ in self.named_parameters_list if any(p in n for p in self.active_param_prefixs)
            ]
            if any("lora" in n for n in names):
                break
            self._update_active_block_idx()
            self.active_param_prefixs = self.block_prefix_list[self.current_block_idx] + self.active_modules
        self.active_block = self.current_block_idx
        logger.info("BAdam: block %d trainable: %s", self.active_block, self.active_param_prefixs)
        self._switch_trainable_params_single_gpu()
        self.base_optimizer.state = defaultdict(dict)  # the new block starts from fresh moments
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _update_active_block_idx(self) -> None:
        if self.switch_mode != "random":
            return super()._update_active_block_idx()
        if not self.block_order:
            self.block_order = torch.randperm(self.block_num, generator=self._generator).tolist()
        self.current_block_idx = self.block_order.pop()

    def _switch_trainable_params_single_gpu(self, verbose: int | None = None) -> None:
        self.param_idx2lp, self.param_idx2hp = {}, {}
        # one active group per given group, with its hyperparameters (upstream rebuilds two groups)
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in self.param_groups]
        for i, (name, param) in enumerate(self.named_parameters_list):
            if not any(p in name for p in self.active_param_prefixs):
                param.requires_grad_(False)
                param.grad = None
                continue
            if self.lora_mode and "lora" not in name:
                continue
            param.requires_grad_(True)
            if param.dtype == torch.float32:
                master = param  # a float32 copy of a float32 weight would only cost memory
            else:
                master = param.detach().clone().float()
                master.requires_grad_(True)
            self.param_idx2lp[i] = param
            self.param_idx2hp[i] = master
            groups[self._group_of[id(param)]]["params"].append(master)
        self.base_optimizer.param_groups = groups

    def apply_requires_grad(self) -> None:
        """Freeze every parameter but the active block's (again, e.g. after :meth:`restore_requires_grad`)."""
        active = {id(p) for p in self.param_idx2lp.values()}
        for _, p in self.named_parameters_list:
            p.requires_grad_(id(p) in active)

    def restore_requires_grad(self) -> None:
        """Give every parameter back the ``requires_grad`` it had when the optimizer was built."""
        for (_, p), flag in zip(self.named_parameters_list, self._initial_requires_grad):
            p.requires_grad_(flag)

    # -- the step ------------------------------------------------------------------------------------
    def _update_lr(self) -> None:
        # every hyperparameter the scheduler (or the user) set on a group reaches its active group
        for base_group, group in zip(self.base_optimizer.param_groups, self.param_groups):
            base_group.update((k, v) for k, v in group.items() if k != "params")

    def _grad_to_hp(self, clear_lp_grads: bool = True) -> None:
        for lp, hp in zip(self.param_idx2lp.values(), self.param_idx2hp.values()):
            if hp is lp:
                continue
            hp.grad = None if lp.grad is None else lp.grad.float()
            if clear_lp_grads:
                lp.grad = None

    def _update_param(self) -> None:
        for lp, hp in zip(self.param_idx2lp.values(), self.param_idx2hp.values()):
            if hp is not lp:
                lp.data.copy_(hp.to(lp.dtype).data)

    def _clean_hp_grad(self) -> None:
        for lp, hp in zip(self.param_idx2lp.values(), self.param_idx2hp.values()):
            if hp is not lp:
                hp.grad = None

    def step(self, closure=None):
        """One base-optimizer step on the active block; switch blocks on upstream's schedule."""
        self._update_lr()
        self._grad_to_hp()
        loss = self.base_optimizer.step() if closure is None else self.base_optimizer.step(closure)
        self._update_param()
        self._clean_hp_grad()
        self.global_step += 1
        self.last_block = self.active_block
        if (self.global_step + 1) % self.switch_block_every == 0:  # upstream's schedule, kept
            self.switch_trainable_params()
        return loss

    # -- checkpoints ---------------------------------------------------------------------------------
    def _flat_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """torch's layout over every parameter (state for the active block only) + the block schedule."""
        out = torch.optim.Optimizer.state_dict(self)  # outer groups: lr, initial_lr, parameter indices
        index = {id(p): i for i, p in enumerate(self._flat_params())}
        lp_of = {id(hp): lp for lp, hp in zip(self.param_idx2lp.values(), self.param_idx2hp.values())}
        out["state"] = {
            index[id(lp_of[id(hp)])]: dict(state) for hp, state in self.base_optimizer.state.items() if state
        }
        out[STATE_KEY] = {
            "active_block": self.active_block,
            "next_block": self.current_block_idx,
            "global_step": self.global_step,
            "block_order": list(self.block_order),
            "generator": self._generator.get_state(),
            "num_blocks": self.block_num,
            "switch_mode": self.switch_mode,
            "switch_block_every": self.switch_block_every,
            # bf16/fp16 weights: the fp32 master copies carry the bits the low-precision weights lost
            "masters": {
                index[id(lp)]: hp
                for lp, hp in zip(self.param_idx2lp.values(), self.param_idx2hp.values())
                if hp is not lp
            },
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        schedule = state_dict.get(STATE_KEY)
        if schedule is None:
            raise ValueError(
                "this optimizer state has no 'badam' entry: it was not saved by optitrainer_badam's "
                "BlockOptimizer (upstream's BlockOptimizer saves the active block's state without saying "
                "which block it belongs to, so it cannot be resumed exactly); resume from a checkpoint "
                "written with optim='badam', or start the run again"
            )
        if schedule["num_blocks"] != self.block_num:
            raise ValueError(
                f"the checkpoint's BAdam schedule has {schedule['num_blocks']} blocks, this model and "
                f"these options give {self.block_num}: resume with the same model and block options"
            )
        for key in ("switch_mode", "switch_block_every"):
            if schedule[key] != getattr(self, key):
                logger.warning(
                    "BAdam: the checkpoint was written with %s=%r, resuming with %r",
                    key,
                    schedule[key],
                    getattr(self, key),
                )
        # the outer groups: learning rate and scheduler entries (torch checks the group sizes)
        torch.optim.Optimizer.load_state_dict(self, {"state": {}, "param_groups": state_dict["param_groups"]})
        self.current_block_idx = int(schedule["active_block"])
        self._activate()
        self.current_block_idx = int(schedule["next_block"])
        self.global_step = int(schedule["global_step"])
        self.block_order = [int(b) for b in schedule["block_order"]]
        self._generator.set_state(schedule["generator"])
        flat = self._flat_params()
        hp_of = {id(lp): hp for lp, hp in zip(self.param_idx2lp.values(), self.param_idx2hp.values())}
        base = self.base_optimizer.state_dict()  # the active groups, no state yet
        position = {
            id(p): i for i, p in enumerate(p for g in self.base_optimizer.param_groups for p in g["params"])
        }
        state = {}
        for index, value in state_dict["state"].items():
            hp = hp_of.get(id(flat[int(index)]))
            if hp is None:
                raise ValueError(
                    f"the checkpoint holds optimizer state for parameter #{index}, outside the active "
                    f"block {self.active_block}: it was written with other block options"
                )
            state[position[id(hp)]] = value
        base["state"] = state
        self.base_optimizer.load_state_dict(base)  # torch casts the state to each parameter's device
        with torch.no_grad():
            for index, master in schedule.get("masters", {}).items():
                hp = hp_of.get(id(flat[int(index)]))
                if hp is not None and hp is not flat[int(index)]:
                    hp.copy_(master)


def block_problems(
    named: Sequence[tuple[str, Any]], blocks: Sequence[Sequence[str]], start_block: int | None
) -> list[str]:
    """What is wrong with a block list for these parameters (empty: nothing)."""
    if not blocks:
        return [
            "BAdam found no block: no parameter name contains 'layers.<i>.' (and include_embedding/"
            "include_lm_head are off); give the blocks with block_prefixes='prefixA;prefixB|prefixC'"
        ]
    problems = []
    names = [n for n, _ in named]
    for i, block in enumerate(blocks):
        if not any(prefix in n for prefix in block for n in names):
            problems.append(
                f"BAdam block {i} {list(block)} matches no trainable parameter: fix block_prefixes "
                f"(first names: {names[:3]})"
            )
    if start_block is not None and not 0 <= start_block < len(blocks):
        problems.append(
            f"start_block={start_block} is out of range: there are {len(blocks)} blocks (0..{len(blocks) - 1})"
        )
    return problems
