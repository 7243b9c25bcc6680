"""Recipes and callbacks for the jobs on the local SLURM cluster (``slurm_kit.X`` as class path,
``tests/slurm`` on ``PYTHONPATH``).

The jobs train the framework's own HDF5 datamodule with two loader workers per rank (the
user's path: Slurm signals those workers too), a tiny U-Net, and the checkpoints recipes have:
a monitor checkpoint (``best.ckpt``), every-N-steps checkpoints with ``save_last`` and, after a
signal, ``requeue.ckpt``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class SlowUntilSignalled(pl.Callback):
    """Inside a Slurm job's first ``allocations`` allocations, makes each training batch last
    ``seconds`` until a requeue signal arrives, so Slurm's own timer (``--time`` with
    ``--signal``) ends the allocation mid-training; later allocations run at full speed.
    Outside Slurm (reference runs) it does nothing; it never changes what is computed."""

    def __init__(self, seconds: float = 1.0, allocations: int = 1):
        self.seconds, self.allocations = seconds, allocations

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from trainer.requeue_signals import received

        if "SLURM_JOB_ID" not in os.environ or int(os.environ.get("SLURM_RESTART_COUNT", "0")) >= self.allocations:
            return
        deadline = time.monotonic() + self.seconds
        while received() is None and time.monotonic() < deadline:
            time.sleep(0.05)


def data_spec(path: Path) -> dict[str, Any]:
    return {"class_path": "datamodules.hdf5.HDF5SegDataModule",
            "init_args": {"path": str(path), "spatial_dims": 2, "patch_size": [32, 32], "batch_size": 2,
                          # 2 validation cases: evaluation is sharded by whole case, one per rank of 2
                          "num_workers": 2, "samples_per_epoch": 16, "val_fraction": 0.25,
                          "generate": {"cases": 8, "shape": [4, 32, 32], "seed": 0}}}


def recipe(run: Path, data: Path, *, max_steps: int, callbacks: list[dict] | None = None, devices: int = 1) -> dict:
    """A fit recipe whose checkpoints go to ``run/checkpoints``."""
    ckpt_dir = str(run / "checkpoints")
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "max_steps": max_steps, "max_epochs": -1,
            "use_distributed_sampler": False, "default_root_dir": str(run), "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": ckpt_dir, "filename": "best", "monitor": "val/dice", "mode": "max",
                               "enable_version_counter": False}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": ckpt_dir, "filename": "{step:04d}", "every_n_train_steps": 4, "save_top_k": 2,
                               "monitor": "step", "mode": "max", "save_last": True, "save_on_train_epoch_end": True}},
                *(callbacks or []),
            ],
        },
        "model": {
            "net": {"class_path": "trainer.models.UNet",
                    "init_args": {"spatial_dims": 2, "num_classes": 5, "depth": 2, "base_channels": 4}},
            "num_classes": 5,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
        },
        "data": data_spec(data),
    }
