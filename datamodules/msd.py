"""Medical Segmentation Decathlon and nnU-Net raw folders: ``dataset.json`` + ``imagesTr/`` (+
``labelsTr/``, ``imagesTs/``), read into the cases ``data convert`` loads (:mod:`datamodules.convert`).

* nnU-Net v2: ``channel_names`` ``{"0": "CT"}``, ``labels`` ``{"background": 0, "liver": 1}``,
  ``file_ending`` (default ``.nii.gz``); images ``imagesTr/<case>_0000<ending>``, ``_0001``...
  (one file per channel), labels ``labelsTr/<case><ending>``; test images in ``imagesTs``.
* MSD / nnU-Net v1: ``modality`` ``{"0": "FLAIR", "1": "T1w"}``, ``labels`` ``{"0":
  "background", "1": "edema"}``, ``training`` ``[{"image": "./imagesTr/x.nii.gz", "label":
  "./labelsTr/x.nii.gz"}]`` (several channels: one 4D NIfTI), ``test`` ``["./imagesTs/..."]``.

Channel names choose each channel's normalisation (nnU-Net's mapping, :mod:`datamodules.preprocess`),
label names become the class names. Paths in ``dataset.json`` must stay inside the folder;
region-based labels (lists of values) are refused; macOS ``._*`` files are skipped.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from datamodules.convert import SourceCase, SourceSet
from trainer.errors import UserError
from trainer.inputs import read_text_file


def _dataset_json(folder: str) -> dict:
    path = os.path.join(folder, "dataset.json")
    try:
        data = json.loads(read_text_file(path, "convert: dataset.json", limit=64 * 2**20))
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"convert: {path} is not valid JSON ({' '.join(str(e).split())[:150]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("labels"), dict):
        raise UserError(f"convert: {path} has no 'labels' mapping; is it an MSD / nnU-Net dataset.json?")
    return data


def _class_names(labels: dict, path: str) -> list[str]:
    """Class names by value from v2 ``{name: value}`` or v1 ``{"value": name}``; values 0..K-1."""
    if all(isinstance(v, str) for v in labels.values()):  # v1: {"0": "background", ...}
        try:
            by_value = {int(k): v for k, v in labels.items()}
        except ValueError:
            raise UserError(f"convert: {path}: labels keys {list(labels)[:4]} must be the label values") from None
    else:  # v2: {"background": 0, ...}
        regions = [k for k, v in labels.items() if not isinstance(v, int) or isinstance(v, bool)]
        if regions:
            raise UserError(f"convert: {path}: label {regions[0]!r} is {labels[regions[0]]!r}; region-based labels "
                            "(lists of values) are not supported, each class needs one integer value")
        by_value = {v: k for k, v in labels.items()}
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise UserError(f"convert: {path}: label values {sorted(by_value)} must be 0..K-1 with 0 the background")
    return [str(by_value[i]) for i in range(len(by_value))]


def _channel_names(data: dict, path: str) -> list[str]:
    channels = data.get("channel_names", data.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise UserError(f"convert: {path} has no 'channel_names' (nnU-Net v2) or 'modality' (MSD) mapping")
    try:
        by_index = {int(k): str(v) for k, v in channels.items()}
    except ValueError:
        raise UserError(f"convert: {path}: channel keys {list(channels)[:4]} must be 0, 1, ...") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise UserError(f"convert: {path}: channel keys {sorted(by_index)} must be 0..C-1")
    return [by_index[i] for i in range(len(by_index))]


def _inside(folder: str, relative: Any, path: str) -> str:
    """A path from dataset.json, refused unless it stays inside the dataset folder."""
    if not isinstance(relative, str):
        raise UserError(f"convert: {path}: file entry {relative!r} is not a path")
    full = os.path.normpath(os.path.join(folder, relative))
    if os.path.commonpath([os.path.abspath(full), os.path.abspath(folder)]) != os.path.abspath(folder):
        raise UserError(f"convert: {path}: {relative!r} points outside the dataset folder")
    return full


def read_dataset_folder(folder: str, unlabelled: bool) -> SourceSet:
    path = os.path.join(folder, "dataset.json")
    data = _dataset_json(folder)
    classes, channels = _class_names(data["labels"], path), _channel_names(data, path)
    if "channel_names" in data:
        cases = _v2_cases(folder, data, len(channels), unlabelled, path)
        kind = "nnU-Net v2 raw"
    else:
        cases = _v1_cases(folder, data, unlabelled, path)
        kind = "Medical Segmentation Decathlon / nnU-Net v1"
    if not cases:
        raise UserError(f"convert: {folder}: dataset.json lists no training cases")
    return SourceSet(folder, cases, channels, classes, {"kind": kind, "name": str(data.get("name", ""))})


def _v2_cases(folder: str, data: dict, n_channels: int, unlabelled: bool, path: str) -> list[SourceCase]:
    ending = data.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise UserError(f"convert: {path}: file_ending {ending!r} must be like '.nii.gz'")
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    out = []
    for sub, labelled in (("imagesTr", True), ("imagesTs", False)):
        if not labelled and not unlabelled or not os.path.isdir(os.path.join(folder, sub)):
            continue
        found: dict[str, dict[int, str]] = {}
        for name in sorted(os.listdir(os.path.join(folder, sub))):
            m = pattern.match(name)
            if m and not name.startswith("."):  # "._x" files: macOS metadata in some archives
                found.setdefault(m["case"], {})[int(m["channel"])] = os.path.join(folder, sub, name)
        for case_id, files in sorted(found.items()):
            if sorted(files) != list(range(n_channels)):
                raise UserError(f"convert: {folder}/{sub}: case {case_id!r} has channel files {sorted(files)}, "
                                f"dataset.json names {n_channels} channels (_0000.._{n_channels - 1:04d})")
            label = os.path.join(folder, "labelsTr", case_id + ending) if labelled else None
            if label is not None and not os.path.exists(label):
                raise UserError(f"convert: {folder}: case {case_id!r} has no label labelsTr/{case_id}{ending}")
            out.append(SourceCase(case_id if labelled else f"{case_id}_test", "volume",
                                  [files[i] for i in range(n_channels)], label))
    return out


def _v1_cases(folder: str, data: dict, unlabelled: bool, path: str) -> list[SourceCase]:
    training = data.get("training")
    if not isinstance(training, list):
        raise UserError(f"convert: {path}: 'training' must be a list of {{'image', 'label'}} entries")
    out = []
    for entry in training:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise UserError(f"convert: {path}: training entry {str(entry)[:80]} needs 'image' and 'label'")
        image = _inside(folder, entry["image"], path)
        out.append(SourceCase(_stem(image), "volume", [image], _inside(folder, entry["label"], path)))
    for entry in data.get("test", []) if unlabelled else []:
        image = _inside(folder, entry if isinstance(entry, str) else entry.get("image"), path)
        out.append(SourceCase(_stem(image) + "_test", "volume", [image], None))
    return out


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name
