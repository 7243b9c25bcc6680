"""Fixtures for the export tests: tiny trained 2D/3D U-Nets and validation batches."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from export_helpers import batches, synthetic, train, unet  # noqa: E402

from trainer.export import ExportMeta  # noqa: E402


@pytest.fixture(scope="session")
def data2d():
    image, label = synthetic(32, dims=2, size=32, seed=0)
    return {"train": (image[:24], label[:24]), "val": batches(image[24:], label[24:], batch_size=4)}


@pytest.fixture(scope="session")
def net2d(data2d):
    """Depth 2 (divisor 4), 8 base channels, trained to ~0.97 Dice on the synthetic task."""
    return train(unet(2, base=8), *data2d["train"], steps=150)


@pytest.fixture(scope="session")
def meta2d():
    return ExportMeta(spatial_dims=2, num_classes=3, class_names=["background", "box", "ball"], divisor=4)


@pytest.fixture(scope="session")
def data3d():
    image, label = synthetic(8, dims=3, size=16, seed=1)
    val_image, val_label = synthetic(2, dims=3, size=24, seed=2)  # larger than roi: sliding windows
    return {"train": (image, label), "val": batches(val_image, val_label, batch_size=1)}


@pytest.fixture(scope="session")
def net3d(data3d):
    return train(unet(3, base=4), *data3d["train"], steps=30, batch_size=4)


@pytest.fixture(scope="session")
def meta3d():
    return ExportMeta(spatial_dims=3, num_classes=3, class_names=["background", "box", "ball"], divisor=4, roi_size=[16, 16, 16])
