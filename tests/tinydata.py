"""A tiny in-memory datamodule for unit tests of training-side code (no files, seconds).

It obeys the framework's batch contract: ``{"image": float32 [B, C, *S], "label": int64
[B, *S], "index": int64 [B], "case": list[str], "labelled": bool [B]}``; validation yields
whole images. ``n_unlabelled`` training items follow the labelled ones, with placeholder
labels of zeros and ``labelled=False`` (as unlabelled cases of a data file). Import
it in tests as ``from tinydata import TinySegDataModule`` (``tests/`` is on sys.path via
conftest), or name ``tinydata.TinySegDataModule`` as ``class_path`` with ``tests/`` on
PYTHONPATH.
"""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader


def make_sample(index: int, spatial_dims: int, size: int, num_classes: int, seed: int = 0) -> dict:
    """Blobs of classes 1..K-1 on background, with noise; deterministic per (seed, index)."""
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    shape = (size,) * spatial_dims
    grids = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * spatial_dims, indexing="ij")
    label = torch.zeros(shape, dtype=torch.long)
    for cls in range(1, num_classes):
        center = torch.rand(spatial_dims, generator=g) * size * 0.6 + size * 0.2
        radius = size * (0.25 - 0.04 * cls)
        dist2 = sum((gr - c) ** 2 for gr, c in zip(grids, center))
        label[dist2 < radius**2] = cls
    image = label.float()[None] / num_classes + 0.15 * torch.randn((1, *shape), generator=g)
    return {"image": image, "label": label, "index": torch.tensor(index), "case": f"case{index:03d}", "labelled": True}


class TinySegDataModule(pl.LightningDataModule):
    """Args: spatial_dims (2|3), size (edge length), n_train, n_val, num_classes, batch_size, seed,
    n_unlabelled."""

    def __init__(self, spatial_dims: int = 2, size: int = 32, n_train: int = 8, n_val: int = 4,
                 num_classes: int = 3, batch_size: int = 4, seed: int = 0, n_unlabelled: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.in_channels = 1
        self.patch_size = [size] * spatial_dims  # training items are whole images of this size
        self.class_names = ["background"] + [f"organ{i}" for i in range(1, num_classes)]
        h = self.hparams
        self.train_items = [make_sample(i, spatial_dims, size, num_classes, seed) for i in range(n_train)]
        for i in range(n_train, n_train + n_unlabelled):
            item = make_sample(i, spatial_dims, size, num_classes, seed)
            self.train_items.append({**item, "label": torch.zeros_like(item["label"]), "labelled": False})
        self.val_items = [make_sample(10_000 + i, spatial_dims, size, num_classes, seed) for i in range(n_val)]

    def train_dataloader(self):
        return DataLoader(self.train_items, batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val_items, batch_size=1 if self.spatial_dims == 3 else 2)

    def test_dataloader(self):
        return self.val_dataloader()
