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
from lightning.pytorch.cli import instantiate_module

import datamodules  # noqa: F401  (makes the built-in datamodule classes importable by class_path)
from trainer.checkpointing import load_checkpoint
from trainer.distill.features import Adapters
from trainer.errors import UserError
from trainer.inputs import load_yaml_text
from trainer.module import SegmentationModule
from trainer.structure import CHECKPOINT_KEY, replay
from trainer.trust import check_tree

TRAINING_ONLY_PREFIXES = (f"{Adapters.ATTR}.",)


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
    datamodule = build_datamodule(path, ckpt) if with_data else None
    if datamodule is not None and module.class_names is None:
        module.class_names = list(getattr(datamodule, "class_names", []) or []) or None
    recipe = _stored_recipe(path, ckpt)
    return RestoredRun(module.eval(), datamodule, recipe, path, ckpt)


def _stored_recipe(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    section = ckpt.get(CHECKPOINT_KEY) or {}
    text = section.get("recipe") if isinstance(section, dict) else None
    if not text:
        return {}
    if not isinstance(text, str):
        raise UserError(f"{path}: its stored recipe ({CHECKPOINT_KEY}.recipe) is not text")
    recipe = load_yaml_text(text, f"{path}: stored recipe")  # size- and alias-checked
    return recipe if isinstance(recipe, dict) else {}


def _hparams(path: Path, ckpt: dict[str, Any], key: str) -> dict[str, Any]:
    value = ckpt.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: '{key}' is a {type(value).__name__}, not a mapping; not a checkpoint of `launch.py fit`")
    hparams = dict(value)
    hparams.pop("_instantiator", None)
    # Nothing a checkpoint names is imported unless its module is trusted (trainer/trust.py).
    check_tree(hparams, f"{path}: {key}")
    return hparams


def _build_module(path: Path, ckpt: dict[str, Any]) -> SegmentationModule:
    hparams = _hparams(path, ckpt, "hyper_parameters")
    hparams["init_from"] = None  # the checkpoint's own weights replace it; the file may be gone
    # A restored run evaluates, exports or teaches; it never steps an optimizer, so the
    # optimizer and scheduler factories the checkpoint names are not rebuilt at all.
    hparams.pop("optimizer", None)
    hparams.pop("lr_scheduler", None)
    if not isinstance(hparams.get("net"), dict):
        raise UserError(f"{path}: checkpoint has no recipe for its network (hyper_parameters.net); "
                        "it was not written by `launch.py fit`")
    if hparams.get("loss") is not None and not isinstance(hparams["loss"], dict):
        raise UserError(f"{path}: hyper_parameters.loss is {hparams['loss']!r}, not a class_path mapping")
    try:
        module = instantiate_module(SegmentationModule, hparams)
    except Exception as exc:  # jsonargparse reports bad class paths/arguments
        raise UserError(f"{path}: cannot rebuild the model from its hyper_parameters: {' '.join(str(exc).split())[:300]}") from None
    # A consolidated DeepSpeed ZeRO directory names every parameter its optimizer held,
    # distillation adapters included; they are training state of the Distillation callback
    # (saved in its own section), not part of the model.
    weights = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    replay(module.net, ckpt.get(CHECKPOINT_KEY, {}).get("structure", []))  # pruning/QAT structure
    module.check_checkpoint_fits({**ckpt, "state_dict": weights}, path)  # one line naming the file
    module.load_state_dict(weights)
    return module


def build_datamodule(path: Path, ckpt: dict[str, Any], overrides: dict[str, Any] | None = None
                     ) -> pl.LightningDataModule | None:
    """The checkpoint's datamodule, set up for validation; ``overrides`` replace recipe arguments
    (``launch.py verify --data``: another file, every case). None when the recipe has none."""
    hparams = _hparams(path, ckpt, "datamodule_hyper_parameters")
    if "_class_path" not in hparams:
        return None
    hparams.update(overrides or {})
    try:
        dm = instantiate_module(pl.LightningDataModule, hparams)
    except Exception as exc:
        raise UserError(f"{path}: cannot rebuild the datamodule {hparams['_class_path']}: {' '.join(str(exc).split())[:300]}") from None
    dm.prepare_data()
    dm.setup("validate")
    return dm
