"""A trained nnU-Net v2 model folder as a distillation teacher.

The folder nnU-Net writes (``nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/``)::

    plans.json      network architecture (per configuration), normalisation schemes, dataset
                    intensity statistics, axis transposition, spacing
    dataset.json    channel names, label names
    fold_0/checkpoint_final.pth     {"network_weights": state dict, "init_args": {...}, ...}

``Distillation.teacher`` may name the configuration folder (its only fold, or ``fold_all``),
a ``fold_X`` folder, or the checkpoint file; several folds make an ensemble (a list). The
network is built the way nnU-Net builds it, with ``dynamic_network_architectures``
(``pip install compressseg[nnunet]``), from ``plans.json``'s
``configurations.<c>.architecture`` (``network_class_name``, ``arch_kwargs``; the class
names in it are imported only under ``dynamic_network_architectures`` and ``torch.nn``, or
modules trusted through ``COMPRESSSEG_TRUSTED_MODULES``). Deep supervision is off (the
teacher's full-resolution logits are what distillation reads).

What the teacher expects of its input, read from the plans and honoured by
:mod:`trainer.distill.teacher_input`: each channel's normalisation
(``normalization_schemes`` with ``use_mask_for_norm``; CT with the dataset's
``foreground_intensity_properties_per_channel``), the axis order (``transpose_forward``) and
the spacing (``configurations.<c>.spacing``, checked against the data's record).
The checkpoint is read with ``weights_only=True`` (numpy scalars in its training log allowed).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.errors import UserError
from trainer.trust import check_class_path

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
IMPORTABLE = ("dynamic_network_architectures", "torch.nn")
# nnU-Net v2's normalisation classes -> the data record's schemes (datamodules.preprocess)
SCHEMES = {"CTNormalization": "CT", "ZScoreNormalization": "zscore", "NoNormalization": "noNorm",
           "RescaleTo01Normalization": "rescale_to_0_1", "RGBTo01Normalization": "rgb_to_0_1"}


@dataclass
class NnUNetModel:
    """Where the files are and what the plans say."""

    checkpoint: Path
    plans: dict[str, Any]
    dataset: dict[str, Any]
    configuration: str

    @property
    def config(self) -> dict[str, Any]:
        return self.plans["configurations"][self.configuration]


def is_nnunet(path: Path) -> bool:
    """``path`` is an nnU-Net configuration folder, fold folder or checkpoint file."""
    if path.is_dir():
        return (path / "plans.json").is_file() or (path.parent / "plans.json").is_file()
    return path.suffix == ".pth" and (path.parent.parent / "plans.json").is_file()


def locate(path: Path) -> NnUNetModel:
    """Resolve ``path`` to the checkpoint, plans and dataset description; one-line errors."""
    if path.is_file():
        checkpoint, folder = path, path.parent.parent
    else:
        folder = path if (path / "plans.json").is_file() else path.parent
        fold = path if folder != path else _only_fold(path)
        checkpoint = next((fold / c for c in CHECKPOINTS if (fold / c).is_file()), None)
        if checkpoint is None:
            raise UserError(f"nnU-Net teacher {fold}: no {' or '.join(CHECKPOINTS)} in it")
    plans, dataset = _json(folder / "plans.json"), _json(folder / "dataset.json")
    configuration = _configuration(folder, checkpoint, plans)
    return NnUNetModel(checkpoint, plans, dataset, configuration)


def _only_fold(folder: Path) -> Path:
    folds = sorted(p for p in folder.glob("fold_*") if p.is_dir())
    if len(folds) == 1:
        return folds[0]
    if (folder / "fold_all").is_dir():
        return folder / "fold_all"
    names = [f.name for f in folds] or ["none"]
    raise UserError(f"nnU-Net teacher {folder} holds folds {names}; name one (…/fold_0), or list several "
                    "for an ensemble")


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"nnU-Net teacher: {path} is missing (an nnU-Net v2 results folder has plans.json and dataset.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"nnU-Net teacher: {path} is not readable JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"nnU-Net teacher: {path} is not a JSON object")
    return data


def _configuration(folder: Path, checkpoint: Path, plans: dict[str, Any]) -> str:
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or not configs:
        raise UserError(f"nnU-Net teacher: {folder / 'plans.json'} has no 'configurations'")
    parts = folder.name.split("__")  # <Trainer>__<Plans>__<configuration>, nnU-Net's naming
    name = parts[-1] if len(parts) == 3 else None
    if name is None:
        name = (load_checkpoint(checkpoint).get("init_args") or {}).get("configuration")
    if name not in configs:
        raise UserError(f"nnU-Net teacher {folder}: configuration {name!r} is not in plans.json ({sorted(configs)}); "
                        "the folder name should be <Trainer>__<Plans>__<configuration>")
    return str(name)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``; numpy scalars and dtypes (nnU-Net's training log) allowed."""
    safe = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]
    scalar = getattr(getattr(np, "_core", np.core).multiarray, "scalar", None)
    if scalar is not None:
        safe.append(scalar)
    try:
        with torch.serialization.safe_globals(safe):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling/zip errors of every kind
        raise UserError(f"nnU-Net teacher checkpoint {path} is not readable with weights_only=True "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("network_weights"), dict):
        raise UserError(f"nnU-Net teacher checkpoint {path} has no 'network_weights' (not written by nnU-Net v2?)")
    return blob


def _locate_class(name: str, where: str) -> type:
    check_class_path(name, where, IMPORTABLE)
    module, _, attr = name.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[attr]), attr)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        hint = (" (pip install --no-deps dynamic-network-architectures einops; `launch.py setup` does)"
                if missing.startswith("dynamic_network_architectures") else "")
        raise UserError(f"{where}: cannot import {name}{hint}: {exc}") from None
    except AttributeError:
        raise UserError(f"{where}: {module} has no {attr}") from None


def channel_names(dataset: dict[str, Any]) -> list[str]:
    names = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(names, dict) or not names:
        raise UserError("nnU-Net teacher: dataset.json has no 'channel_names'")
    return [str(names[k]) for k in sorted(names, key=int)]


def num_classes(dataset: dict[str, Any]) -> int:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise UserError("nnU-Net teacher: dataset.json has no 'labels'")
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise UserError("nnU-Net teacher: dataset.json defines regions (overlapping labels, sigmoid outputs); "
                        "only label maps (softmax over classes) can teach a segmentation student")
    return len(labels)


def build_network(model: NnUNetModel) -> nn.Module:
    """The network of the plans' configuration with the checkpoint's weights, deep supervision off."""
    arch = model.config.get("architecture")
    where = f"nnU-Net teacher {model.checkpoint.parent.parent / 'plans.json'} ({model.configuration})"
    if not isinstance(arch, dict) or "network_class_name" not in arch:
        raise UserError(f"{where}: no 'architecture' with 'network_class_name' (plans of nnU-Net v2.4 or newer are "
                        "supported; re-plan older datasets with a current nnU-Net)")
    kwargs = dict(arch.get("arch_kwargs") or {})
    for key in arch.get("_kw_requires_import") or []:
        if kwargs.get(key) is not None:
            kwargs[key] = _locate_class(str(kwargs[key]), f"{where}: arch_kwargs.{key}")
    cls = _locate_class(str(arch["network_class_name"]), where)
    try:
        net = cls(input_channels=len(channel_names(model.dataset)), num_classes=num_classes(model.dataset),
                  deep_supervision=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise UserError(f"{where}: {cls.__name__} refused the plans' arch_kwargs: {str(exc).splitlines()[0][:200]}") from None
    weights = load_checkpoint(model.checkpoint)["network_weights"]
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(f"nnU-Net teacher checkpoint {model.checkpoint} does not fit the network of {where}: "
                        f"{' '.join(str(exc).split())[:240]}") from None
    return net


def expected_input(model: NnUNetModel) -> dict[str, Any]:
    """What the network expects: ``{"channels": [per-channel scheme dicts], "transpose": [...],
    "spacing": [stored-axis order mm], "source": ...}`` (vocabulary of ``datamodules.preprocess``)."""
    cfg, names = model.config, channel_names(model.dataset)
    schemes = cfg.get("normalization_schemes") or []
    masks = cfg.get("use_mask_for_norm") or [False] * len(schemes)
    props = model.plans.get("foreground_intensity_properties_per_channel") or {}
    if len(schemes) != len(names):
        raise UserError(f"nnU-Net teacher plans name {len(schemes)} normalisation schemes for {len(names)} channels")
    channels = []
    for i, (scheme, masked) in enumerate(zip(schemes, masks)):
        if scheme not in SCHEMES:
            raise UserError(f"nnU-Net teacher channel {i} ({names[i]}): normalisation {scheme!r} is not one of {sorted(SCHEMES)}")
        entry: dict[str, Any] = {"name": names[i], "scheme": SCHEMES[scheme]}
        if entry["scheme"] == "zscore" and masked:
            entry["scheme"] = "zscore_nonzero"
        if entry["scheme"] == "CT":
            p = props.get(str(i)) or props.get(i)
            if not p:
                raise UserError(f"nnU-Net teacher channel {i}: CTNormalization needs foreground_intensity_properties_per_channel")
            entry.update(clip=[float(p["percentile_00_5"]), float(p["percentile_99_5"])], mean=float(p["mean"]),
                         std=float(p["std"]))
        channels.append(entry)
    forward = [int(t) for t in model.plans.get("transpose_forward", [0, 1, 2])]
    spacing_t = [float(s) for s in cfg.get("spacing") or []]
    spacing = [0.0] * len(forward)
    for j, axis in enumerate(forward[-len(spacing_t):] if len(spacing_t) < len(forward) else forward):
        spacing[axis] = spacing_t[j] if j < len(spacing_t) else 0.0
    return {"channels": channels, "transpose": forward, "spacing": spacing,
            "source": f"nnU-Net plans {model.plans.get('plans_name', '?')} / {model.configuration}"}
