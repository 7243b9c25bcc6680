"""Evaluation under DeepSpeed ZeRO-3: every rank runs the same number of forward passes.

ZeRO-3 partitions the parameters; each forward pass all-gathers them, layer by layer, on
every rank together. Validation breaks that lockstep twice: the evaluation shards differ in
size by one case (``datamodules`` never duplicates a case), and a 3D volume's sliding window
takes as many forward passes as it has windows, which depends on the volume's shape. A rank
with fewer passes leaves the others waiting in an all-gather forever (a hang, not an error).

:class:`EvenForwards` keeps the lockstep with two small all-reduces:

* at a rank's first batch: the most batches any rank has (every rank has a first batch);
* at every batch: the most forward passes any rank's batch needs (counted beforehand with
  the sliding window's own arithmetic, :func:`forward_passes`). A rank whose batch needs
  fewer runs the rest on a dummy input.

A rank out of batches must still take part in the others' remaining rounds, and each round
is one call of the DeepSpeed *engine* (its start-of-forward hook is a collective too, found
running ZeRO-3 on two CPU ranks). So after its last batch it calls the engine itself with
:data:`PHANTOM` batches, which Lightning's wrapper hands back to ``validation_step``; the
module answers them with :meth:`EvenForwards.phantom_round` (dummy passes only). All of this
happens before any epoch-end hook (which syncs metrics).

Dummy passes only move parameters; their outputs are dropped. Nothing happens outside ZeRO-3.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from monai.data.utils import dense_patch_slices
from torch import nn

from trainer import collectives


PHANTOM = {"zero3_phantom_round": True}  # a batch that is only a round of lockstep


def is_phantom(batch: Any) -> bool:
    return isinstance(batch, dict) and batch.get("zero3_phantom_round") is True


def scan_interval(image: Sequence[int], roi: Sequence[int], overlap: float) -> tuple[int, ...]:
    """The sliding window's step per axis (as MONAI's ``sliding_window_inference`` computes it)."""
    return tuple(int(r) if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(image, roi))


def forward_passes(shape: Sequence[int], roi_size: Sequence[int] | None, overlap: float, sw_batch_size: int) -> int:
    """Forward passes :func:`trainer.inference.predict_logits` makes for an input ``[B, C, *S]``."""
    spatial = [int(s) for s in shape[2:]]
    if roi_size is None or not any(s > r for s, r in zip(spatial, roi_size)):
        return 1  # the whole (padded) image at once
    image = [max(s, int(r)) for s, r in zip(spatial, roi_size)]  # small axes are padded up to the window
    windows = len(dense_patch_slices(image, [int(r) for r in roi_size], scan_interval(image, roi_size, overlap)))
    return math.ceil(windows * int(shape[0]) / sw_batch_size)


class EvenForwards:
    """Lockstep forward passes for one evaluation epoch of a ZeRO-3 module (see module doc).

    Args:
        net: the network (its parameters tell whether ZeRO-3 partitions it).
        like: a real input (batch), whose channels, dtype and device a dummy pass copies.
        dummy_size: spatial size of a dummy pass, e.g. the sliding window's ``roi_size``.
    """

    def __init__(self, net: nn.Module, like: torch.Tensor, dummy_size: Sequence[int]):
        self.net = net
        self.dummy = dict(size=[1, int(like.shape[1]), *[int(s) for s in dummy_size]], dtype=like.dtype, device=like.device)
        self.rounds = 0  # the most batches of any rank this epoch
        self.done = 0

    @staticmethod
    def needed(net: nn.Module, trainer: Any) -> bool:
        return collectives.distributed(trainer) and collectives.zero3_partitioned(list(net.parameters()))

    def batch(self, trainer: Any, batch_idx: int, own_batches: int, passes: int, run: Callable[[Callable], Any],
              step: Callable[[dict], Any]) -> Any:
        """Run ``run(fn)`` (``fn``: the counting forward) for this rank's batch ``batch_idx`` of
        ``own_batches``, padded to the most passes of any rank; after the last batch, the
        rounds this rank lacks, each as ``step(PHANTOM)`` (one engine call, see
        :func:`through_engine`). Returns what ``run`` returned."""
        if batch_idx == 0:
            self.rounds, self.done = self._max(trainer, own_batches), 0
        target = self._max(trainer, passes)
        calls = 0

        def counting(x: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return self.net(x)

        out = run(counting)
        if calls > target:
            raise RuntimeError(f"ZeRO-3 evaluation: {calls} forward passes for a batch planned at {target}; "
                               "trainer.zero3_eval.forward_passes no longer matches the sliding window")
        self._dummies(target - calls)
        self.done += 1
        if batch_idx == own_batches - 1:
            while self.done < self.rounds:  # this rank is out of batches; the others are not
                step(dict(PHANTOM))  # -> the engine -> validation_step -> phantom_round
        return out

    def phantom_round(self, trainer: Any) -> None:
        """One round of another rank's batch, for a rank that has none left."""
        self._dummies(self._max(trainer, 0))
        self.done += 1

    def _max(self, trainer: Any, value: int) -> int:
        return int(collectives.reduce(trainer, torch.tensor([int(value)], dtype=torch.long), "max").item())

    @torch.no_grad()
    def _dummies(self, count: int) -> None:
        if count <= 0:
            return
        x = torch.zeros(**self.dummy)
        for _ in range(count):
            self.net(x)


def through_engine(engine: nn.Module, module: nn.Module, method: str, *args: Any) -> Any:
    """``module.<method>(*args)`` called through ``engine`` (the DeepSpeed engine wrapping
    ``module``), so that the engine's forward hooks, collectives among them, run as for a step
    Lightning makes: ``module.forward`` is redirected to ``method`` for this one call."""
    had_own = "forward" in module.__dict__
    original = module.forward

    def redirected(*a: Any, **kw: Any) -> Any:
        _restore(module, original, had_own)
        return getattr(module, method)(*a, **kw)

    module.forward = redirected
    try:
        return engine(*args)
    finally:
        _restore(module, original, had_own)


def _restore(module: nn.Module, original: Callable, had_own: bool) -> None:
    if had_own:
        module.forward = original
    else:
        module.__dict__.pop("forward", None)
