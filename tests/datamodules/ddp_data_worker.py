"""Run under ``torchrun --nproc_per_node=2``: each rank iterates the train/val loaders of the
datamodules given on the command line (rank and world size come from torch.distributed, the
loaders use 2 workers each) and writes the sample keys it saw to ``<out>/rank<r>.json``, the
validation cases it scored, and ``trainer.metrics`` scores of a fixed prediction (the label
rolled by one voxel) synchronised across the ranks.

Usage: ddp_data_worker.py OUT_DIR PATH:DIMS [PATH:DIMS ...]; a PATH that does not exist is
generated from a small phantom by local rank 0 in prepare_data (the others wait).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from datamodules.hdf5 import HDF5SegDataModule
from datamodules.tfrecord import TFRecordSegDataModule
from trainer.metrics import SegmentationMetrics


def rolled_scores(dm, loader) -> dict:
    """Scores of the label rolled by one voxel along W: a fixed, imperfect prediction."""
    metric = SegmentationMetrics(dm.num_classes, dm.class_names)
    cases = set()
    for batch in loader:
        metric.update(torch.roll(batch["label"], 1, -1), batch["label"], batch)
        cases.update(batch["case"])
    scores = metric.compute()  # synchronised over the ranks when torch.distributed is up
    return {"cases": sorted(cases), "n_cases": scores.cases, "mean_dice": scores.mean_dice,
            "mean_hd95": scores.mean_hd95, "partial": scores.partial_cases}


def main(out_dir: str, specs: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for spec in specs:
        path, dims = spec.rsplit(":", 1)
        dims = int(dims)
        cls = HDF5SegDataModule if path.endswith(".h5") else TFRecordSegDataModule
        dm = cls(path, dims, [16] * dims, batch_size=3, num_workers=2, samples_per_epoch=17, val_fraction=0.4,
                 generate={"cases": 5, "shape": [4, 32, 32] if dims == 2 else [16, 32, 32], "seed": 3})
        if int(os.environ["LOCAL_RANK"]) == 0:
            dm.prepare_data()
        dist.barrier()
        dm.setup()
        train = [k for b in dm.train_dataloader() for k in b["index"].tolist()]
        train_steps = len(dm.train_dataloader())
        val = [k for b in dm.val_dataloader() for k in b["index"].tolist()]
        results[spec] = {"train": train, "train_steps": train_steps, "val": val,
                         "n_train": dm.num_train_samples(world), "n_val": len(dm.val_dataloader().dataset),
                         "scores": rolled_scores(dm, dm.val_dataloader())}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": world, "results": results}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
