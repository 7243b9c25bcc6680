"""Run under ``torchrun --nproc_per_node=2``: each rank iterates the train/val loaders of the
datamodules given on the command line (rank and world size come from torch.distributed, the
loaders use 2 workers each) and writes the sample keys it saw to ``<out>/rank<r>.json``.

Usage: ddp_data_worker.py OUT_DIR PATH:DIMS [PATH:DIMS ...]; a PATH that does not exist is
generated from a small phantom by local rank 0 in prepare_data (the others wait).
"""
from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from datamodules.hdf5 import HDF5SegDataModule
from datamodules.tfrecord import TFRecordSegDataModule


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
                         "n_train": dm.num_train_samples(world), "n_val": len(dm.val_dataloader().dataset)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": world, "results": results}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
