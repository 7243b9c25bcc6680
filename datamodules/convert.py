"""Read a folder of NumPy or NIfTI cases and write it as ``compressseg-h5`` or TFRecord.

Folder convention (one case = one pair of files, case id = the common prefix)::

    <case>_image.npy      + <case>_label.npy        image [D,H,W] | [C,D,H,W] | [H,W] | [C,H,W]
    <case>.npz            with arrays image, label (and optional spacing)
    <case>_image.nii[.gz] + <case>_label.nii[.gz]   NIfTI (x, y, z[, c]); spacing from the header
    spacing.json          optional {"<case>": [z, y, x], ...} for NumPy cases (mm; default 1 1 1)

With ``unlabelled=True`` (``data convert --unlabelled``) an image without a label (no
``<case>_label`` file, no ``label`` array in the ``.npz``) becomes an unlabelled case, an image
for distillation (see :mod:`datamodules.schema`); an unlabelled NumPy image with three axes is
read as ``[D, H, W]``.

NumPy images without a channel axis get one; a 2D image ``[H, W]`` becomes ``[1, 1, H, W]``
(whether a 3-axis image is ``[D, H, W]`` or ``[C, H, W]`` is decided by the label's axes).
NIfTI volumes are transposed from (x, y, z) to (z, y, x) and their zooms likewise. Images
are stored as float32, labels as uint8; labels must be whole numbers in ``[0, num_classes)``.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from datamodules.schema import check_spacing
from trainer.errors import UserError

_PAIR = re.compile(r"^(?P<case>.+)_(?P<kind>image|label)\.(?P<ext>npy|nii|nii\.gz)$")


@dataclass
class SourceCase:
    case_id: str
    kind: str  # "npy", "npz", "nifti"
    image: str
    label: str | None = None


def find_cases(folder: str, unlabelled: bool = False) -> list[SourceCase]:
    """Discover cases by the naming convention; unmatched halves are errors (an image alone is
    an unlabelled case when ``unlabelled``)."""
    if not os.path.isdir(folder):
        raise UserError(f"convert: source {folder} is not a directory of cases")
    pairs: dict[tuple[str, str], dict[str, str]] = {}
    cases: list[SourceCase] = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".npz"):
            cases.append(SourceCase(name[: -len(".npz")], "npz", path))
            continue
        m = _PAIR.match(name)
        if m:
            kind = "nifti" if m["ext"].startswith("nii") else "npy"
            pairs.setdefault((m["case"], kind), {})[m["kind"]] = path
    for (case_id, kind), files in sorted(pairs.items()):
        if "image" not in files or "label" not in files and not unlabelled:
            have = next(iter(files.values()))
            missing = "label" if "image" in files else "image"
            hint = " (pass --unlabelled to store images without labels)" if missing == "label" else ""
            raise UserError(f"convert: {have} has no matching {case_id}_{missing} file in {folder}{hint}")
        cases.append(SourceCase(case_id, kind, files["image"], files.get("label")))
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UserError(f"convert: cases {dupes} exist in more than one form (npz/npy/nifti) in {folder}")
    if not cases:
        raise UserError(
            f"convert: no cases in {folder}; expected <case>_image.npy + <case>_label.npy, <case>.npz, "
            "or <case>_image.nii.gz + <case>_label.nii.gz"
        )
    return sorted(cases, key=lambda c: c.case_id)


def _to_layout(image: np.ndarray, label: np.ndarray | None, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    if label is None:  # unlabelled: [H,W] -> [1,1,H,W], [D,H,W] -> [1,D,H,W]
        image = image[None, None] if image.ndim == 2 else image[None] if image.ndim == 3 else image
        if image.ndim != 4:
            raise UserError(f"{where}: image shape {list(image.shape)} does not fit [C,]D,H,W (or H,W)")
        return image, None
    if label.ndim == 2:
        label = label[None]
        if image.ndim == 2:
            image = image[None, None]
        elif image.ndim == 3:
            image = image[:, None]
    elif label.ndim == 3 and image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or label.ndim != 3:
        raise UserError(f"{where}: image shape {list(image.shape)} / label shape {list(label.shape)} do not fit "
                        "[C,]D,H,W / D,H,W (or [C,]H,W / H,W)")
    return image, label


def _label_to_uint8(label: np.ndarray, where: str) -> np.ndarray:
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            raise UserError(f"{where}: label has non-integer values; labels must be class indices")
    elif label.dtype.kind not in "biu":
        raise UserError(f"{where}: label dtype {label.dtype} is not numeric")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise UserError(f"{where}: label values span [{label.min()}, {label.max()}], outside [0, 255]")
    return label.astype(np.uint8)


def _image_to_float32(image: np.ndarray, where: str) -> np.ndarray:
    if image.dtype.kind not in "biuf":
        raise UserError(f"{where}: image dtype {image.dtype} is not numeric")
    return np.ascontiguousarray(image, dtype=np.float32)


def load_case(case: SourceCase, spacing_table: dict,
              unlabelled: bool = False) -> tuple[str, np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    where = f"convert {case.image}"
    spacing = spacing_table.get(case.case_id, (1.0, 1.0, 1.0))
    if case.kind == "npz":
        with np.load(case.image) as z:
            for key in ("image",) if unlabelled else ("image", "label"):
                if key not in z:
                    raise UserError(f"{where}: array {key!r} is missing (has {sorted(z.files)})")
            image, label = z["image"], z["label"] if "label" in z else None
            if "spacing" in z:
                spacing = z["spacing"]
    elif case.kind == "npy":
        image, label = np.load(case.image), None if case.label is None else np.load(case.label)
    else:
        import nibabel as nib

        try:
            img_nii = nib.load(case.image)
            image = np.asarray(img_nii.get_fdata(dtype=np.float32))
            label = None if case.label is None else np.asanyarray(nib.load(case.label).dataobj)
        except Exception as e:  # nibabel raises many types for damaged files
            raise UserError(f"{where}: cannot read NIfTI ({e})") from None
        axes = (2, 1, 0) if image.ndim == 3 else (3, 2, 1, 0)
        if image.ndim not in (3, 4) or label is not None and label.ndim != 3:
            got = f"{image.shape} and {label.shape}" if label is not None else f"{image.shape}"
            raise UserError(f"{where}: NIfTI image must be (x, y, z[, c]) and label (x, y, z); got {got}")
        image = image.transpose(axes)
        if image.ndim == 3:
            image = image[None]
        label = None if label is None else label.transpose(2, 1, 0)
        spacing = tuple(float(s) for s in img_nii.header.get_zooms()[:3][::-1])
    label = None if label is None else _label_to_uint8(np.asarray(label), where)
    image, label = _to_layout(_image_to_float32(image, where), label, where)
    return case.case_id, image, None if label is None else np.ascontiguousarray(label), check_spacing(spacing, where)


def read_spacing_table(folder: str, spacing_json: str | None) -> dict:
    path = spacing_json or os.path.join(folder, "spacing.json")
    if not os.path.exists(path):
        if spacing_json:
            raise UserError(f"convert: spacing file {spacing_json} does not exist")
        return {}
    try:
        with open(path) as f:
            table = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"convert: {path} is not valid JSON ({e})") from None
    if not isinstance(table, dict):
        raise UserError(f'convert: {path} must map case ids to [z, y, x], e.g. {{"case_0": [3.0, 0.8, 0.8]}}')
    return {k: check_spacing(v, f"{path} case {k!r}") for k, v in table.items()}


def iter_folder_cases(folder: str, spacing_json: str | None = None, unlabelled: bool = False) -> Iterator[tuple]:
    table = read_spacing_table(folder, spacing_json)
    for case in find_cases(folder, unlabelled):
        yield load_case(case, table, unlabelled)
