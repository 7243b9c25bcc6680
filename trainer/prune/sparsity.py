"""Unstructured (weight) sparsity: global magnitude masks through ``torch.nn.utils.prune``.

The ratio is the *cumulative fraction of all prunable weights set to zero* (conv,
ConvTranspose and linear weights, except protected layers), ranked globally by |w|
(``prune.global_unstructured`` with ``L1Unstructured``). Masks only: the network is no
smaller and, on dense kernels, no faster; use channel pruning for speed.

While training, each pruned layer holds ``weight_orig`` (a parameter) and ``weight_mask``
(a buffer), so both are in the checkpoint and a resumed run continues with the same zeros.
That changes the layer's state-dict keys, so attaching masks is a structural change,
recorded as :class:`SparsityMasks` (its rebuild attaches all-ones masks that the checkpoint
then fills). :func:`make_permanent` folds the masks into ``weight`` (``prune.remove``) and is
recorded as :class:`SparsityPermanent`, so checkpoints from either side load.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from trainer.errors import UserError
from trainer.prune.schedule import check_ratio
from trainer.structure import history, record

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def prunable_layers(net: nn.Module, protected: Sequence[str] = ()) -> list[str]:
    """Names of conv/linear layers outside ``protected`` (a name protects its whole subtree)."""
    def is_protected(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in protected)
    return [n for n, m in net.named_modules() if isinstance(m, _WEIGHTED) and not is_protected(n)]


def has_masks(net: nn.Module) -> bool:
    return any(prune.is_pruned(m) for m in net.modules() if m is not net) or prune.is_pruned(net)


class SparsityMasks:
    """Structural record: masks attached to ``state["layers"]`` (weights become weight_orig * weight_mask)."""

    @classmethod
    def rebuild(cls, net: nn.Module, state: dict[str, Any]) -> None:
        modules = dict(net.named_modules())
        missing = [n for n in state["layers"] if n not in modules]
        if missing:
            raise UserError(f"sparsity history does not match the model: {type(net).__name__} has no layer {missing[0]!r}")
        for name in state["layers"]:
            prune.identity(modules[name], "weight")  # all-ones mask; the checkpoint fills the real one


class SparsityPermanent:
    """Structural record: the masks of ``state["layers"]`` were folded into the weights."""

    @classmethod
    def rebuild(cls, net: nn.Module, state: dict[str, Any]) -> None:
        modules = dict(net.named_modules())
        for name in state["layers"]:
            if name not in modules or not prune.is_pruned(modules[name]):
                raise UserError(f"sparsity history does not match the model: layer {name!r} has no mask to make permanent")
            prune.remove(modules[name], "weight")


def masked_layers(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, _WEIGHTED) and hasattr(m, "weight_mask")]


@torch.no_grad()
def sparsify(net: nn.Module, ratio: float, protected: Sequence[str] = ()) -> dict[str, float]:
    """Zero the globally smallest weights until ``ratio`` of all prunable weights are zero.

    Cumulative: weights already masked stay masked and count towards ``ratio``. The first
    call attaches masks and records :class:`SparsityMasks`. Returns
    ``{"ratio", "zeroed", "total"}``.
    """
    check_ratio(ratio, "sparsity ratio")
    modules = dict(net.named_modules())
    names = masked_layers(net) or prunable_layers(net, protected)
    if not names:
        raise UserError(f"unstructured pruning: {type(net).__name__} has no conv/linear layer outside protected {list(protected)}")
    params = [(modules[n], "weight") for n in names]
    total = sum(m.weight.numel() for m, _ in params)
    already = sum(int((m.weight_mask == 0).sum()) for m, _ in params if hasattr(m, "weight_mask"))
    target = int(round(ratio * total))
    first = not masked_layers(net)
    if target > already:
        # ``amount`` as a count applies to the weights still unmasked (PruningContainer).
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=target - already)
    elif first:
        for m, _ in params:
            prune.identity(m, "weight")
    if first:
        record(net, SparsityMasks, {"layers": names})
    zeroed = sum(int((m.weight_mask == 0).sum()) for m, _ in params)
    return {"ratio": zeroed / total, "zeroed": zeroed, "total": total}


def match_mask_dtypes(net: nn.Module) -> None:
    """Give every mask its weight's dtype. DeepSpeed's ``*-mixed`` precision casts parameters
    (``weight_orig``) to half but keeps buffers (``weight_mask``) in fp32, and ``orig * mask``
    would then promote the weight back to fp32 under half inputs. 0 and 1 are exact in any dtype."""
    for m in net.modules():
        mask, orig = getattr(m, "weight_mask", None), getattr(m, "weight_orig", None)
        if isinstance(mask, torch.Tensor) and isinstance(orig, torch.Tensor) and mask.dtype != orig.dtype:
            m.weight_mask = mask.to(orig.dtype)


def make_permanent(net: nn.Module) -> list[str]:
    """Fold every mask into its weight (``prune.remove``) and record it; returns the layers.

    Call before export (an exported graph should hold plain zeros, not mask multiplies) and
    at the end of training. A no-op on a network without masks.
    """
    names = masked_layers(net)
    if not names:
        return []
    modules = dict(net.named_modules())
    for name in names:
        prune.remove(modules[name], "weight")
    record(net, SparsityPermanent, {"layers": names})
    return names


def mask_history(net: nn.Module) -> bool:
    """Whether the structural history holds unstructured masks not yet made permanent."""
    open_masks = 0
    for entry in history(net):
        if entry["converter"].endswith(".SparsityMasks"):
            open_masks += 1
        elif entry["converter"].endswith(".SparsityPermanent"):
            open_masks -= 1
    return open_masks > 0
