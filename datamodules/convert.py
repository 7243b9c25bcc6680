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
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from datamodules.schema import check_spacing
from trainer.errors import UserError
from trainer.inputs import read_text_file, require_file

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
    for source in (case.image, case.label):
        if source is not None:
            require_file(source, "convert: source")
    if case.kind == "npz":
        image, label, stored_spacing = _read_npz(case.image, unlabelled, where)
        spacing = spacing if stored_spacing is None else stored_spacing
    elif case.kind == "npy":
        image = _read_npy(case.image, where)
        label = None if case.label is None else _read_npy(case.label, f"convert {case.label}")
    else:
        image, label, spacing = _read_nifti(case, where)
    label = None if label is None else _label_to_uint8(np.asarray(label), where)
    image, label = _to_layout(_image_to_float32(image, where), label, where)
    return case.case_id, image, None if label is None else np.ascontiguousarray(label), check_spacing(spacing, where)


def _read_npy(path: str, where: str) -> np.ndarray:
    """One ``.npy`` array; never unpickles (object arrays are refused)."""
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise UserError(f"{where}: holds a Python object array; only numeric arrays are read (never unpickled)") from None
        raise UserError(f"{where}: not a readable .npy array ({' '.join(str(e).split())[:150]})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{where}: not a readable .npy array ({type(e).__name__}: {' '.join(str(e).split())[:150]})") from None


def _read_npz(path: str, unlabelled: bool, where: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``image``, ``label`` (None if absent), ``spacing`` (None if absent) of a ``.npz``; never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as z:
            for key in ("image",) if unlabelled else ("image", "label"):
                if key not in z.files:
                    raise UserError(f"{where}: array {key!r} is missing (has {sorted(z.files)})")
            return tuple(z[key] if key in z.files else None for key in ("image", "label", "spacing"))
    except UserError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise UserError(f"{where}: holds a Python object array; only numeric arrays are read (never unpickled)") from None
        raise UserError(f"{where}: not a readable .npz archive ({' '.join(str(e).split())[:150]})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{where}: not a readable .npz archive ({type(e).__name__}: {' '.join(str(e).split())[:150]})") from None


def _read_nifti(case: SourceCase, where: str) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """Image ``[C, z, y, x]`` and label ``[z, y, x]`` on the image's grid (see :func:`label_on_image_grid`)."""
    import nibabel as nib

    try:
        img_nii = nib.load(case.image)
        image = np.asarray(img_nii.get_fdata(dtype=np.float32))
        lab_nii = None if case.label is None else nib.load(case.label)
        label = None if lab_nii is None else np.asanyarray(lab_nii.dataobj)
    except Exception as e:  # nibabel raises many types for damaged files
        raise UserError(f"{where}: cannot read NIfTI ({' '.join(str(e).split())[:200]})") from None
    if image.ndim not in (3, 4) or label is not None and label.ndim != 3:
        got = f"{image.shape} and {label.shape}" if label is not None else f"{image.shape}"
        raise UserError(f"{where}: NIfTI image must be (x, y, z[, c]) and label (x, y, z); got {got}")
    if label is not None:
        label = label_on_image_grid(img_nii.affine, image.shape[:3], lab_nii.affine, label, f"convert {case.label}")
    image = image.transpose((2, 1, 0) if image.ndim == 3 else (3, 2, 1, 0))
    if image.ndim == 3:
        image = image[None]
    label = None if label is None else label.transpose(2, 1, 0)
    spacing = tuple(float(s) for s in img_nii.header.get_zooms()[:3][::-1])
    return image, label, spacing


def label_on_image_grid(image_affine: np.ndarray, image_shape, label_affine: np.ndarray, label: np.ndarray,
                        where: str) -> np.ndarray:
    """The label voxel-aligned with the image, or a one-line refusal.

    Same grid (affines equal within 1/1000 of the smallest voxel): unchanged. The same grid
    stored with axes permuted or flipped (the label's affine is the image's after a pure axis
    permutation/flip, origin included): reoriented onto the image's axes, with a note. Any
    other difference (spacing, origin, rotation) would need resampling: refused, naming both
    orientations, spacings and origins."""
    from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    a, b = np.asarray(image_affine, float), np.asarray(label_affine, float)
    zooms = np.sqrt((a[:3, :3] ** 2).sum(0))
    tol = max(1e-3 * float(zooms.min()), 1e-6)
    if tuple(label.shape) == tuple(image_shape) and np.allclose(a, b, rtol=0, atol=tol):
        return label
    transform = ornt_transform(io_orientation(b), io_orientation(a))
    moved = apply_orientation(label, transform)
    moved_affine = b @ inv_ornt_aff(transform, label.shape)
    if tuple(moved.shape) == tuple(image_shape) and np.allclose(a, moved_affine, rtol=0, atol=tol):
        print(f"note: {where}: label stored as {''.join(aff2axcodes(b))}, image as {''.join(aff2axcodes(a))} on the "
              "same grid; label reoriented onto the image's axes", file=sys.stderr)
        return np.ascontiguousarray(moved)

    def grid(aff: np.ndarray, shape) -> str:
        sp = np.sqrt((aff[:3, :3] ** 2).sum(0))
        return (f"{''.join(aff2axcodes(aff))} shape {list(shape)} spacing {[round(float(v), 4) for v in sp]} "
                f"origin {[round(float(v), 3) for v in aff[:3, 3]]}")

    raise UserError(f"{where}: label and image are not on the same grid (label {grid(b, label.shape)}, image "
                    f"{grid(a, image_shape)}); resample the label onto the image first")


def read_spacing_table(folder: str, spacing_json: str | None) -> dict:
    path = spacing_json or os.path.join(folder, "spacing.json")
    if not os.path.lexists(path) and not spacing_json:
        return {}
    try:
        table = json.loads(read_text_file(path, "convert: spacing file", limit=64 * 2**20))
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"convert: {path} is not valid JSON ({' '.join(str(e).split())[:150]})") from None
    if not isinstance(table, dict):
        raise UserError(f'convert: {path} must map case ids to [z, y, x], e.g. {{"case_0": [3.0, 0.8, 0.8]}}')
    return {k: check_spacing(v, f"{path} case {k!r}") for k, v in table.items()}


def iter_folder_cases(folder: str, spacing_json: str | None = None, unlabelled: bool = False) -> Iterator[tuple]:
    table = read_spacing_table(folder, spacing_json)
    for case in find_cases(folder, unlabelled):
        yield load_case(case, table, unlabelled)
