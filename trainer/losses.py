"""Supervised segmentation loss: Dice + cross-entropy, deep-supervision aware.

Built on MONAI's ``DiceCELoss`` (soft Dice on softmax probabilities plus CE, as in nnU-Net).
Lower-resolution deep-supervision outputs are scored against a nearest-downsampled label
with halving weights by default (MONAI's ``DeepSupervisionLoss`` cannot resize integer
labels, hence the few lines here).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn


class DiceCE(nn.Module):
    """Dice + CE on logits ``[B, K, *S]`` (or a list of them) against labels ``[B, *S]``.

    Args:
        dice_weight: weight of the soft Dice term. Default 1.0.
        ce_weight: weight of the cross-entropy term. Default 1.0.
        batch_dice: compute Dice over the whole batch rather than per sample (more stable
            for small structures absent from some patches). Default True.
        include_background: score the background class in Dice. Default False.
        ds_weights: weights of deep-supervision outputs, highest resolution first; ``None``
            halves the weight at each level (MONAI's ``exp`` mode).
        class_weights: one weight per class, background first, for both terms (CE's class
            weights, a weighted mean over voxels; Dice's per-class loss scaled); ``None``
            weighs every class alike. A configuration, not a state: kept out of checkpoints.

    Example:
        >>> loss = DiceCE()
        >>> logits = torch.zeros(2, 3, 8, 8); label = torch.zeros(2, 8, 8, dtype=torch.long)
        >>> float(loss(logits, label)) > 0
        True
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        batch_dice: bool = True,
        include_background: bool = False,
        ds_weights: Sequence[float] | None = None,
        class_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError(f"DiceCE: dice_weight={dice_weight}, ce_weight={ce_weight} must be >= 0, not both 0")
        weight = None
        if class_weights is not None:
            weight = torch.tensor([float(w) for w in class_weights])
            if weight.dim() != 1 or len(weight) < 2 or not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()) \
                    or not bool((weight > 0).any()):
                raise ValueError(f"DiceCE: class_weights={list(class_weights)} must be >= 2 finite weights >= 0, not all 0")
        self.class_weights = None if weight is None else weight.tolist()
        base = DiceCELoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            batch=batch_dice,
            lambda_dice=dice_weight,
            lambda_ce=ce_weight,
            weight=weight,
        )
        for module in base.modules():  # MONAI keeps the weights as buffers: not checkpoint state
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module.register_buffer(name, buffer, persistent=False)
        self.base = base
        self.ds_weights = list(ds_weights) if ds_weights else None

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        # Computed in float32 even under bf16 autocast: softmax/log of bf16 logits loses the
        # small lesion classes.
        target = label.unsqueeze(1)  # MONAI wants [B, 1, *S]
        if self.class_weights is not None:
            first = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
            if first.shape[1] != len(self.class_weights):
                raise ValueError(f"DiceCE: class_weights has {len(self.class_weights)} entries for {first.shape[1]} classes")
        if isinstance(outputs, torch.Tensor):
            return self.base(outputs.float(), target)
        weights = self.ds_weights or [0.5**k for k in range(len(outputs))]
        if len(weights) != len(outputs):
            raise ValueError(f"DiceCE: {len(outputs)} deep-supervision outputs but ds_weights={weights}")
        total = 0.0
        for w, out in zip(weights, outputs):
            t = target if out.shape[2:] == target.shape[2:] else downsample_label(target, out.shape[2:])
            total = total + w * self.base(out.float(), t)
        return total / sum(weights)


def downsample_label(label: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of an integer label map ``[B, 1, *S]``."""
    return F.interpolate(label.float(), size=tuple(size), mode="nearest").long()
