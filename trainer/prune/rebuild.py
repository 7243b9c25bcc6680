"""Rebuilding what holds on to parameters after a structural change mid-fit.

Channel pruning replaces every pruned ``nn.Parameter`` by a smaller one. Three things still
point at the old objects and must be rebuilt, in this order:

1. **The DDP wrapper** (``DistributedDataParallel``): its reducer registered autograd hooks
   and gradient buckets on the old parameters, so the new ones would never be all-reduced.
   The strategy unwraps to the LightningModule and wraps again (``configure_ddp``), which
   also verifies that every rank holds the same shapes and broadcasts rank 0's values.
2. **The optimizers and schedulers**: rebuilt by ``trainer.strategy.setup_optimizers``,
   i.e. the module's own ``configure_optimizers``, so param groups are whatever the recipe
   says.
3. **Their state**, unless ``rewind`` is set: per-parameter state (Adam moments, momentum)
   is carried over by parameter *name* and sliced to the kept channels; param-group
   hyper-parameters (the current LR) and scheduler positions are copied. With ``rewind``
   the fresh optimizer and scheduler start from the recipe's initial LR (LR rewinding,
   Renda et al. 2020).

Unstructured masks keep the ``Parameter`` objects (``weight`` is renamed ``weight_orig``),
so names are compared with the ``_orig`` suffix removed.

Under DeepSpeed nothing can be rebuilt: the engine owns the optimizer (and, in ZeRO, its
partitions of every parameter), and Lightning's ``DeepSpeedStrategy.setup_optimizers`` would
leave the trainer with *no* optimizer. A change that keeps every trainable ``Parameter`` object
and its shape (unstructured masks, QAT with fixed scales) needs no rebuild there and goes on;
anything else is refused in one line naming the strategy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.errors import UserError


def _canonical(name: str) -> str:
    return name[: -len("_orig")] if name.endswith("_orig") else name


@dataclass
class OptimizerSnapshot:
    """Optimizer/scheduler state keyed by parameter name, taken before a structural change."""

    param_state: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # per optimizer
    groups: list[list[dict[str, Any]]] = field(default_factory=list)  # hyper-parameters per group
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    trainable: dict[int, tuple[int, ...]] = field(default_factory=dict)  # id -> shape of trainable parameters


def is_deepspeed(trainer: pl.Trainer) -> bool:
    return "DeepSpeed" in type(trainer.strategy).__name__


def _trainable(pl_module: pl.LightningModule) -> dict[int, tuple[int, ...]]:
    return {id(p): tuple(getattr(p, "ds_shape", p.shape)) for p in pl_module.parameters() if p.requires_grad}


def _check_deepspeed_can_follow(trainer, pl_module, before: OptimizerSnapshot, plan, rewind: bool) -> None:
    kind = type(trainer.strategy).__name__
    if rewind:
        raise UserError(f"{kind}: the DeepSpeed engine owns the optimizer and cannot restart it mid-run (LR rewind); "
                        "use strategy ddp for this run")
    if plan is not None and plan.get("layers"):
        raise UserError(f"{kind}: parameters changed shape mid-run ({', '.join(list(plan['layers'])[:3])}); DeepSpeed's "
                        "engine cannot follow; use strategy ddp for this run")
    now = _trainable(pl_module)
    if now != before.trainable:
        added = len(set(now) - set(before.trainable))
        raise UserError(f"{kind}: the set of trainable parameters changed mid-run ({added} new, "
                        f"{len(set(before.trainable) - set(now))} gone); DeepSpeed's engine cannot follow; "
                        "make the change at epoch 0 (in setup) or use strategy ddp")


def snapshot(trainer: pl.Trainer, pl_module: pl.LightningModule) -> OptimizerSnapshot:
    names = {id(p): _canonical(n) for n, p in pl_module.named_parameters()}
    snap = OptimizerSnapshot(trainable=_trainable(pl_module))
    if is_deepspeed(trainer):  # nothing is rebuilt there (see module doc), only compared
        return snap
    for opt in trainer.optimizers:
        per_param = {}
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in names and p in opt.state:
                    per_param[names[id(p)]] = dict(opt.state[p])
        snap.param_state.append(per_param)
        snap.groups.append([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    snap.schedulers = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
    return snap


def _param_axes(module: nn.Module, pname: str) -> dict[str, int]:
    """Which axis of ``module.<pname>`` holds its output ("out") and input ("in") channels."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if pname == "weight":
            return {"out": 1, "in": 0} if module.transposed else {"out": 0, "in": 1}
        return {"out": 0}
    if isinstance(module, nn.Linear):
        return {"out": 0, "in": 1} if pname == "weight" else {"out": 0}
    return {"out": 0}  # norms, PReLU: one channel axis


def _slicer(net_prefix: str, pl_module: pl.LightningModule, plan: dict[str, Any] | None):
    """``fn(param_name, tensor) -> tensor`` cutting optimizer state to the plan's kept channels."""
    layers = (plan or {}).get("layers", {})
    modules = dict(pl_module.named_modules())

    def cut(name: str, value: torch.Tensor) -> torch.Tensor:
        owner, _, pname = name.rpartition(".")
        if not owner.startswith(net_prefix):
            return value
        entry = layers.get(owner[len(net_prefix):])
        module = modules.get(owner)
        if entry is None or module is None:
            return value
        for dim, axis in _param_axes(module, pname).items():
            if dim in entry and value.dim() > axis and value.shape[axis] == entry[dim]["before"]:
                index = torch.tensor(entry[dim]["keep"], device=value.device, dtype=torch.long)
                value = value.index_select(axis, index)
        return value

    return cut


def rewrap_ddp(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Wrap the module in a fresh ``DistributedDataParallel`` (after its parameters changed)."""
    strategy = trainer.strategy
    if not isinstance(strategy.model, DistributedDataParallel):
        return False
    strategy.model = pl_module  # unwrap; ``configure_ddp`` asserts a bare LightningModule
    strategy.configure_ddp()
    return True


def rebuild_optimizers(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    before: OptimizerSnapshot,
    plan: dict[str, Any] | None = None,
    rewind: bool = False,
    net_prefix: str = "net.",
) -> None:
    """Rebuild DDP, optimizers and schedulers after ``pl_module``'s parameters changed.

    Args:
        trainer: the running trainer (fit).
        pl_module: the module whose net changed.
        before: :func:`snapshot` taken before the change.
        plan: a channel-pruning plan (``trainer.prune.structured``) to slice state with;
            ``None`` when parameter shapes did not change (masks).
        rewind: start optimizer and scheduler afresh at the recipe's initial LR.
        net_prefix: attribute path of the pruned network inside the module.
    """
    if is_deepspeed(trainer):
        _check_deepspeed_can_follow(trainer, pl_module, before, plan, rewind)
        return
    rewrap_ddp(trainer, pl_module)
    trainer.strategy.setup_optimizers(trainer)
    _optimizers_to_device(trainer.strategy.optimizers, trainer.strategy.root_device)
    if rewind:
        return
    optimizers = trainer.optimizers
    if len(optimizers) != len(before.param_state):
        raise UserError(f"PruneRetrain: configure_optimizers returned {len(optimizers)} optimizers after pruning, "
                        f"{len(before.param_state)} before; it must not depend on the network's shape")
    cut = _slicer(net_prefix, pl_module, plan)
    names = {id(p): _canonical(n) for n, p in pl_module.named_parameters()}
    for opt, states, groups in zip(optimizers, before.param_state, before.groups):
        if len(opt.param_groups) == len(groups):
            for group, old in zip(opt.param_groups, groups):
                group.update(old)
        for group in opt.param_groups:
            for p in group["params"]:
                name = names.get(id(p))
                if name not in states:
                    continue
                carried = {}
                for key, value in states[name].items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        value = cut(name, value)
                        if value.shape != p.shape:
                            carried = None  # cannot follow this parameter: it starts afresh
                            break
                    carried[key] = value.clone() if isinstance(value, torch.Tensor) else value
                if carried:
                    opt.state[p] = carried
    for cfg, state in zip(trainer.lr_scheduler_configs, before.schedulers):
        cfg.scheduler.load_state_dict(state)
