"""The small interfaces through which compression techniques plug into training.

Techniques (distillation, QAT, pruning) are Lightning callbacks. They change the model
through documented hooks and never wrap ``forward``; the one extra thing training needs
from them is loss terms, which ``SegmentationModule.training_step`` collects from every
callback that implements ``LossContributor``.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class LossContributor(Protocol):
    """A callback that adds weighted, named loss terms to each training step."""

    def loss_terms(
        self, pl_module: Any, batch: Mapping[str, Any], outputs: torch.Tensor | list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Return ``{name: weighted_loss}``; names are logged as ``train/loss_<name>``."""
        ...
