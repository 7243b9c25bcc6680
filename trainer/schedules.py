"""Learning-rate schedules whose length can follow the run.

``CosineAnnealingLR`` is torch's, with ``T_max`` optional: a recipe that leaves it out gets
``trainer.max_epochs`` (filled in by ``trainer.recipe_rules`` before anything is built), so
``--trainer.max_epochs 3`` shortens the schedule with the run. A resumed run with a new
``max_epochs`` continues towards the new end (``SegmentationModule.on_train_start``).
"""
from __future__ import annotations

import torch


class CosineAnnealingLR(torch.optim.lr_scheduler.CosineAnnealingLR):
    """Cosine annealing from the optimizer's lr to ``eta_min`` over ``T_max`` epochs.

    Args:
        optimizer: the optimizer (given by the module, not the recipe).
        T_max: epochs of the half cosine. ``None`` (recipes): ``trainer.max_epochs``.
        eta_min: the final learning rate. Default 0.
        last_epoch: torch's resume index. Default -1.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, T_max: int | None = None, eta_min: float = 0.0,
                 last_epoch: int = -1):
        if T_max is None:
            raise ValueError("CosineAnnealingLR: T_max is required outside a recipe (a recipe fills it with "
                             "trainer.max_epochs)")
        if int(T_max) < 1:
            raise ValueError(f"CosineAnnealingLR: T_max={T_max} must be >= 1")
        super().__init__(optimizer, T_max=int(T_max), eta_min=eta_min, last_epoch=last_epoch)
