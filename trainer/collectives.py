"""Collectives that are right on every backend, for callbacks that talk to other ranks.

NCCL takes only CUDA tensors on this rank's GPU; gloo takes CPU tensors (and accepts almost
anything), which is why code that passes a CPU tensor to ``all_reduce`` works in every CPU
test and fails on the first multi-GPU run. A callback's tensors are often *not* on that
device: in ``setup`` the network is still on the CPU (Lightning moves it afterwards), and
counters or hashes are made on the host. Every helper here therefore stages its tensors on
:func:`comm_device` (the strategy's root device: ``cuda:<local rank>`` under NCCL, the CPU
under gloo) and hands the result back on the tensor's own device.

The helpers are no-ops in a single process. They must be called by every rank, in the same
order, like any collective.
"""
from __future__ import annotations

import hashlib
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


def world_size(trainer: Any) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


def distributed(trainer: Any) -> bool:
    """More than one rank, with a process group to talk through."""
    return world_size(trainer) > 1 and dist.is_available() and dist.is_initialized()


def comm_device(trainer: Any) -> torch.device:
    """The device a tensor must be on for this run's collectives."""
    return torch.device(trainer.strategy.root_device)


def reduce(trainer: Any, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over ranks (``"sum"``, ``"mean"`` or ``"max"``), on ``tensor``'s device."""
    if world_size(trainer) <= 1:
        return tensor
    staged = tensor.detach().to(comm_device(trainer))
    if op == "max":
        if distributed(trainer):
            dist.all_reduce(staged, op=dist.ReduceOp.MAX)
        return staged.to(tensor.device)
    return trainer.strategy.reduce(staged, reduce_op=op).to(tensor.device)


def broadcast_(trainer: Any, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (one collective per dtype)."""
    if not distributed(trainer):
        return
    device = comm_device(trainer)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset: offset + t.numel()].view_as(t).to(t.device))
                offset += t.numel()


def node_local_result(trainer: Any, compute: Callable[[], str], what: str) -> str:
    """``compute()`` run once per node (local rank 0) instead of on every rank, its string
    result shared with all ranks. For expensive, read-only work such as hashing a dataset
    file that every rank would otherwise read in full. Nodes that disagree (each read its own
    copy of the file, and the copies differ) raise ``ValueError`` naming ``what``."""
    if not distributed(trainer):
        return compute()
    mine = compute() if int(getattr(trainer, "local_rank", 0)) == 0 else None
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    results = sorted({r for r in gathered if r is not None})
    if len(results) != 1:
        raise ValueError(f"{what}: the nodes of this job disagree ({', '.join(r[:12] for r in results) or 'no result'}); "
                         "every node must read identical files")
    return results[0]


def digest_agrees(trainer: Any, text: str) -> bool:
    """True when every rank holds the same ``text`` (compared by a 60-bit digest)."""
    if world_size(trainer) <= 1:
        return True
    value = int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)
    local = torch.tensor([value], dtype=torch.long, device=comm_device(trainer))
    gathered = trainer.strategy.all_gather(local)
    return bool((gathered == local).all())


def zero3_partitioned(params: Sequence[torch.nn.Parameter]) -> bool:
    """Whether DeepSpeed ZeRO-3 holds these parameters partitioned (``ds_id`` set by ``zero.Init``/the engine)."""
    return any(hasattr(p, "ds_id") for p in params)


def gathered(params: Sequence[torch.nn.Parameter], modifier_rank: int | None = None):
    """Context in which ZeRO-3-partitioned ``params`` hold their full values (read-only with
    ``modifier_rank=None``; rank ``modifier_rank``'s changes are kept otherwise). Outside
    ZeRO-3 a plain context. Collective under ZeRO-3: every rank must enter it."""
    params = list(params)
    if not zero3_partitioned(params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
