"""Other people's networks (MONAI's) through the whole chain, in-process, on tiny sizes.

A stage is a real Lightning ``fit`` of ``SegmentationModule`` with the technique callbacks a
recipe would list; modules are built the way ``LightningCLI`` builds them (the recipe's
``class_path`` dicts become the checkpoint's hyper-parameters), so checkpoints are rebuilt by
``restore_run`` exactly as ``launch.py export`` and distillation teachers rebuild them.

Imported as ``from chain_kit import ...`` (this folder is put on sys.path by conftest).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from tinydata import TinySegDataModule  # noqa: E402
from trainer.module import SegmentationModule  # noqa: E402
from trainer.restore import restore_run  # noqa: E402
from trainer.trust import check_class_path  # noqa: E402

CLASSES = 3
MONAI = "monai.networks.nets."


def net_config(name: str, dims: int) -> dict:
    """A tiny MONAI network as a recipe writes it (``class_path`` + ``init_args``), defaults kept
    where they matter: PReLU and InstanceNorm in ``UNet``, GroupNorm(8) in ``SegResNet``,
    deep supervision in ``DynUNet``, attention gates in ``AttentionUnet``."""
    common = {"spatial_dims": dims, "in_channels": 1, "out_channels": CLASSES}
    args = {
        "UNet": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
        "BasicUNet": {"features": [8, 8, 16, 16, 32, 8]},
        "SegResNet": {"init_filters": 8, "blocks_down": [1, 2, 2], "blocks_up": [1, 1]},
        "DynUNet": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2],
                    "filters": [8, 16, 32], "deep_supervision": True, "deep_supr_num": 1},
        "AttentionUnet": {"channels": [8, 16, 32], "strides": [2, 2]},
    }[name]
    return {"class_path": MONAI + name, "init_args": {**common, **args}}


def image_size(name: str, dims: int) -> int:
    """Smallest edge each net runs on in training mode (BasicUNet pools 4 times; its deepest
    InstanceNorm needs more than one voxel)."""
    return 32 if dims == 2 or name == "BasicUNet" else 16


def build_net(config: dict) -> torch.nn.Module:
    check_class_path(config["class_path"], "test network")
    module, _, cls = config["class_path"].rpartition(".")
    return getattr(__import__(module, fromlist=[cls]), cls)(**copy.deepcopy(config["init_args"]))


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)  # a few steps must give the logits real margins


def build_module(config: dict, **model_args) -> SegmentationModule:
    """``SegmentationModule`` as LightningCLI instantiates it: hparams are the recipe's dicts."""
    hparams = {"net": config, "num_classes": CLASSES, **model_args}
    with _given_hyperparameters_context(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
        return SegmentationModule(build_net(config), num_classes=CLASSES, optimizer=_adamw, **model_args)


def datamodule(dims: int, size: int) -> TinySegDataModule:
    return TinySegDataModule(spatial_dims=dims, size=size, n_train=4, n_val=2, num_classes=CLASSES, batch_size=2)


def fit(module: SegmentationModule, data: TinySegDataModule, root: Path, epochs: int, callbacks=()) -> list[Path]:
    """Train, keeping a checkpoint after every epoch; returns them in epoch order."""
    saver = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=[*callbacks, saver],
                         num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    return [root / f"epoch={e}.ckpt" for e in range(epochs)]


def restored_net(ckpt: Path) -> torch.nn.Module:
    return restore_run(ckpt, with_data=False).net.eval()
