"""Rebuild a trained run (network, data, recipe) from one checkpoint file.

Used by export, reports and pipelines: everything needed is inside the checkpoint (the
recipe's class paths and arguments, the structural history, the weights), so the original
YAML file is not needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import instantiate_module

import datamodules  # noqa: F401  (makes the built-in datamodule classes importable by class_path)
from trainer.checkpointing import load_checkpoint
from trainer.errors import UserError
from trainer.module import SegmentationModule
from trainer.structure import CHECKPOINT_KEY

TRAINING_ONLY_PREFIXES = ("distill_adapters.",)  # trainer.distill.features.Adapters.ATTR


@dataclass
class RestoredRun:
    """A trained module in eval mode, its datamodule set up for validation, and its recipe."""

    module: SegmentationModule
    datamodule: pl.LightningDataModule | None
    recipe: dict[str, Any]
    checkpoint_path: Path
    checkpoint: dict[str, Any]

    @property
    def net(self):
        return self.module.net

    @property
    def num_classes(self) -> int:
        return self.module.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.module.class_names or [f"class{i}" for i in range(self.num_classes)])

    @property
    def spatial_dims(self) -> int:
        dims = getattr(self.net, "spatial_dims", None) or getattr(self.datamodule, "spatial_dims", None)
        if dims is None:
            raise UserError(f"{self.checkpoint_path}: cannot tell spatial_dims from the net or the data")
        return int(dims)

    @property
    def in_channels(self) -> int:
        return int(getattr(self.net, "in_channels", None) or getattr(self.datamodule, "in_channels", 1))

    @property
    def roi_size(self) -> list[int] | None:
        return self.module.roi_size

    @property
    def divisor(self) -> int:
        return int(self.module.divisor)


def restore_run(ckpt_path: str | Path, with_data: bool = True) -> RestoredRun:
    """Load ``ckpt_path`` and rebuild its module (eval mode) and, optionally, its data."""
    path = Path(ckpt_path)
    ckpt = load_checkpoint(path)
    module = _build_module(path, ckpt)
    datamodule = _build_datamodule(path, ckpt) if with_data else None
    if datamodule is not None and module.class_names is None:
        module.class_names = list(getattr(datamodule, "class_names", []) or []) or None
    recipe = yaml.safe_load(ckpt.get(CHECKPOINT_KEY, {}).get("recipe") or "{}") or {}
    return RestoredRun(module.eval(), datamodule, recipe, path, ckpt)


def _build_module(path: Path, ckpt: dict[str, Any]) -> SegmentationModule:
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    hparams["init_from"] = None  # the checkpoint's own weights replace it; the file may be gone
    if not isinstance(hparams.get("net"), dict):
        raise UserError(f"{path}: checkpoint has no recipe for its network (hyper_parameters.net); "
                        "it was not written by `launch.py fit`")
    try:
        module = instantiate_module(SegmentationModule, hparams)
    except Exception as exc:  # jsonargparse reports bad class paths/arguments
        raise UserError(f"{path}: cannot rebuild the model from its hyper_parameters: {' '.join(str(exc).split())[:300]}") from None
    module.on_load_checkpoint(ckpt)  # replays pruning/QAT structure
    # A consolidated DeepSpeed ZeRO directory names every parameter its optimizer held,
    # distillation adapters included; they are training state of the Distillation callback
    # (saved in its own section), not part of the model.
    weights = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not match the rebuilt {type(module.net).__name__} "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''})"
        )
    return module


def _build_datamodule(path: Path, ckpt: dict[str, Any]) -> pl.LightningDataModule | None:
    hparams = dict(ckpt.get("datamodule_hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if "_class_path" not in hparams:
        return None
    try:
        dm = instantiate_module(pl.LightningDataModule, hparams)
    except Exception as exc:
        raise UserError(f"{path}: cannot rebuild the datamodule {hparams['_class_path']}: {' '.join(str(exc).split())[:300]}") from None
    dm.prepare_data()
    dm.setup("validate")
    return dm
