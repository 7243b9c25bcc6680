"""Helpers shared by the datamodule tests (tests/datamodules is on sys.path under pytest)."""
from __future__ import annotations

from datamodules import phantom
from datamodules.h5io import write_h5
from datamodules.tfrecord import write_tfrecord

SHAPES = {2: (4, 32, 32), 3: (16, 32, 32)}
CASES = {2: 6, 3: 5}
FORMATS = ("h5", "h5-lzf", "tfrecord", "tfrecord.gz")


def phantom_cases(dims: int, seed: int = 0):
    return phantom.iter_phantom_cases(cases=CASES[dims], shape=SHAPES[dims], seed=seed)


def write_format(path: str, fmt: str, cases, num_classes: int = 5, class_names=None) -> str:
    names = class_names or phantom.class_names(num_classes)
    if fmt.startswith("h5"):
        write_h5(path, cases, num_classes=num_classes, class_names=names,
                 compression="lzf" if fmt == "h5-lzf" else None)
    else:
        write_tfrecord(path, cases, num_classes=num_classes, class_names=names,
                       compression="gzip" if fmt.endswith(".gz") else None)
    return path


def make_dm(path: str, dims: int, **kwargs):
    """The datamodule class that matches ``path``; small patches, no workers unless asked."""
    from datamodules.hdf5 import HDF5SegDataModule
    from datamodules.tfrecord import TFRecordSegDataModule

    cls = HDF5SegDataModule if path.endswith(".h5") else TFRecordSegDataModule
    defaults = {"patch_size": [16, 16] if dims == 2 else [16, 16, 16], "batch_size": 4, "num_workers": 0,
                "val_fraction": 0.4}
    defaults.update(kwargs)
    dm = cls(path, dims, **defaults)
    dm.prepare_data()
    dm.setup()
    return dm
