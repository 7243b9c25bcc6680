"""Shared helpers of the distillation tests: tiny teachers, tiny phantom data, a fake trainer.

Imported as ``from distill_testing import ...`` (tests/distill is put on sys.path by the
test modules that need it).
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from trainer.models.unet import UNet  # noqa: E402
from trainer.module import SegmentationModule  # noqa: E402

LINEAR_TEACHER = "torch.nn.Conv2d"


def unet_kwargs(spatial_dims: int = 2, num_classes: int = 3, depth: int = 2, base: int = 8, ds: bool = False) -> dict:
    kw = dict(spatial_dims=spatial_dims, num_classes=num_classes, depth=depth, base_channels=base)
    if ds:
        kw.update(deep_supervision=True, ds_levels=1)
    return kw


def framework_checkpoint(path: Path, seed: int = 0, **net_kwargs) -> Path:
    """A checkpoint shaped like the ones ``launch.py fit`` writes (recipe dicts as hparams),
    with a randomly initialised UNet: enough for ``restore_run``."""
    torch.manual_seed(seed)
    net = UNet(**net_kwargs)
    net_kwargs = {**net_kwargs, "num_classes": net.num_classes}  # as `fit` records it (model.num_classes fills it)
    module = SegmentationModule(net, num_classes=net.num_classes)
    hparams = {"net": {"class_path": "trainer.models.UNet", "init_args": dict(net_kwargs)},
               "num_classes": net.num_classes}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    return path


def linear_teacher(path: Path, num_classes: int = 5, seed: int = 0, spatial_dims: int = 2) -> tuple[Path, dict]:
    """A pointwise linear teacher (a 1x1 Conv2d) saved as a plain state_dict. Being pointwise
    and linear it commutes with crops, flips, quarter turns and bilinear resampling, so its
    logits on an augmented patch equal the augmented cached logits exactly."""
    torch.manual_seed(seed)
    conv = (torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d)(1, num_classes, kernel_size=1)
    torch.save(conv.state_dict(), path)
    return path, {"in_channels": 1, "out_channels": num_classes, "kernel_size": 1}


def phantom_data_args(tmp_path: Path, spatial_dims: int = 2, **overrides) -> dict:
    """Init args of a tiny phantom ``HDF5SegDataModule`` (generated on first use, < 1 s)."""
    args = dict(
        path=str(tmp_path / f"phantom{spatial_dims}d.h5"), spatial_dims=spatial_dims,
        patch_size=[32, 32] if spatial_dims == 2 else [16, 16, 16], batch_size=4, num_workers=0,
        val_fraction=0.34, samples_per_epoch=8, pad_multiple=16,
        generate={"cases": 6, "shape": [4, 48, 48] if spatial_dims == 2 else [24, 32, 32], "seed": 0},
        aug_intensity_prob=0.0, aug_gamma_prob=0.0, aug_noise_prob=0.0,
    )
    args.update(overrides)
    return args


def phantom_datamodule(tmp_path: Path, spatial_dims: int = 2, **overrides):
    from datamodules.hdf5 import HDF5SegDataModule

    dm = HDF5SegDataModule(**phantom_data_args(tmp_path, spatial_dims, **overrides))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def data_recipe(tmp_path: Path, spatial_dims: int = 2, **overrides) -> Path:
    path = tmp_path / f"data{spatial_dims}d.yaml"
    data = {"class_path": "datamodules.hdf5.HDF5SegDataModule", "init_args": phantom_data_args(tmp_path, spatial_dims, **overrides)}
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def fake_trainer(datamodule=None, loader=None, epoch: int = 0, callbacks=()):
    """The few Trainer attributes the callback reads outside a real fit."""
    return SimpleNamespace(datamodule=datamodule, train_dataloader=loader, current_epoch=epoch,
                           callbacks=list(callbacks), optimizers=[], ckpt_path=None)
